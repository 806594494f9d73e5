"""Resumable bulk jobs: every finished input is appended to a JSON-lines file as it completes.

Run the same call again with the same file after Ctrl-C, a crash or a dead server, and only the
inputs without a saved result are sent. Failed inputs are not saved, so a resume retries them.
Each line carries a fingerprint of its conversation, so a file written for other inputs or other
generation parameters is refused instead of silently mixing results.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import ConfigurationError
from .results import GenerateOutput

_FORMAT = "vllmclient-checkpoint-1"


def fingerprint(value: Any) -> str:
    data = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.blake2b(data.encode(), digest_size=8).hexdigest()


class Checkpoint:
    """The saved results of one job; ``open()`` reads what is there, ``save()`` appends."""

    def __init__(self, path: str | os.PathLike[str], parameters: dict[str, Any], *, keep_outputs: bool) -> None:
        self.path = Path(path)
        self._parameters = fingerprint(parameters)
        self._keep_outputs = keep_outputs
        self.done: dict[int, str] = {}  # index -> conversation fingerprint, of saved results
        self._sent: dict[int, str] = {}  # the same, of inputs sent and not yet saved
        self.outputs: dict[int, GenerateOutput] = {}
        self._file: IO[str] | None = None

    def open(self) -> Checkpoint:
        if self.path.exists() and self.path.stat().st_size:
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        size = self.path.stat().st_size
        if size and _last_byte(self.path) != b"\n":  # a line cut short by a crash: never append to it
            self._file.write("\n")
        if not size:
            self._file.write(json.dumps({"format": _FORMAT, "parameters": self._parameters}) + "\n")
            self._file.flush()
        return self

    def _read(self) -> None:
        with self.path.open(encoding="utf-8") as lines:
            header = _json(next(lines, ""))
            if header.get("format") != _FORMAT:
                raise ConfigurationError(f"{self.path} is not a vllmclient checkpoint; choose another file.")
            if header.get("parameters") != self._parameters:
                raise ConfigurationError(
                    f"{self.path} was written with other generation parameters (num_generations, sampling, "
                    "model or template); resume with the same ones, or use a new checkpoint file."
                )
            for line in lines:
                record = _json(line)
                if "index" not in record:  # a line cut short by a crash: that input is simply redone
                    continue
                self.done[record["index"]] = record["key"]
                if self._keep_outputs:
                    self.outputs[record["index"]] = record["output"]

    def pending(self, items: Iterable[Any], restored: list[tuple[int, GenerateOutput]]) -> Iterator[tuple[int, Any]]:
        """The inputs still to send, as ``(index, conversation)``; saved ones go to ``restored``."""
        for index, item in enumerate(items):
            key = self.done.get(index)
            if key is None:
                self._sent[index] = fingerprint(item)
                yield index, item
                continue
            if key != fingerprint(item):
                raise ConfigurationError(
                    f"input {index} differs from the one saved in {self.path}: the checkpoint belongs to other "
                    "inputs (or their order changed). Use a new checkpoint file for these inputs."
                )
            if self._keep_outputs:
                restored.append((index, self.outputs.pop(index)))

    def save(self, batch: list[tuple[int, GenerateOutput]]) -> None:
        assert self._file is not None
        for index, output in batch:
            key = self._sent.pop(index)
            if "error" not in output:
                self._file.write(json.dumps({"index": index, "key": key, "output": output}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1)


def _json(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
