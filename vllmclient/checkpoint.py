"""Resumable bulk jobs: every finished input is appended to a JSON-lines file as it completes.

Run the same call again with the same file after Ctrl-C, a crash or a dead server, and only the
inputs without a saved result are sent. Failed inputs are not saved, so a resume retries them.
A file written for other inputs or other generation parameters is refused, and never written to:
a refusal says which input or which parameter differs.

The file: a header ``{"format": "vllmclient-checkpoint-2", "parameters": {...}}`` holding the job's
parameters (the request body without the prompts; the tokenizer, Magpie template and
chat_template_kwargs the client renders prompts with; numbers and local paths normalized), then one
``{"index", "key", "output"}`` line per finished input, ``key`` being a fingerprint of its
conversation. Format 1 (the header held only a fingerprint of the parameters) is still read and extended.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeGuard, cast

from .conversation import as_conversation
from .errors import ConfigurationError
from .results import GenerateOutput

if sys.platform != "win32":
    import fcntl

_PREFIX = "vllmclient-checkpoint-"
_FORMAT = _PREFIX + "2"
_FORMAT_1 = _PREFIX + "1"
_CALLER_NAMES = {"max_tokens": "max_new_tokens", "n": "num_generations"}  # request fields as generate() names them

Batch = list[tuple[int, GenerateOutput]]


def fingerprint(value: Any) -> str:
    data = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_plain)
    return hashlib.blake2b(data.encode(), digest_size=8).hexdigest()


def _plain(value: Any) -> Any:
    """An input as what it stands for: an array (``.tolist()``) as a list, a mapping as a dict, else its str."""
    if isinstance(value, Mapping):
        return dict(value)
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else str(value)


class Checkpoint:
    """The saved results of one job: ``open()`` checks the file, ``pending()`` skips what is saved,
    ``settled()`` saves new results as they come."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        request: Mapping[str, Any],
        tokenizer: str | None,
        tokenizer_revision: str | None,
        magpie_pre_query_template: str | None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        keep_outputs: bool,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigurationError(f"checkpoint must be a file path (str or os.PathLike), got {type(path).__name__}.")
        self.path = Path(path).expanduser()
        self._parameters = _canonical({
            "request": request,
            "tokenizer": _local_path(tokenizer),
            "tokenizer_revision": tokenizer_revision,
            "magpie_pre_query_template": magpie_pre_query_template,
            **({} if chat_template_kwargs is None else {"chat_template_kwargs": chat_template_kwargs}),
        })
        # What format 1 fingerprinted: the values as given (it had no chat_template_kwargs: any differ).
        self._fingerprint_1 = fingerprint({
            "request": request, "tokenizer": [tokenizer, tokenizer_revision], "magpie": magpie_pre_query_template,
            **({} if chat_template_kwargs is None else {"chat_template_kwargs": chat_template_kwargs}),
        })
        self._keep_outputs = keep_outputs
        self._done: dict[int, str] = {}  # index -> conversation fingerprint, of saved results not yet compared
        self._outputs: dict[int, GenerateOutput] = {}
        self._restored: Batch = []  # saved results met while reading the inputs, to hand back (keep_outputs)
        self._sent: dict[int, str] = {}  # index -> conversation fingerprint, of inputs sent and not yet saved
        self._verified = False  # every saved result compared with this job's input: writing is safe
        self._file: IO[bytes] | None = None
        self._torn = False  # the file ends in a line cut short by a crash: start the next on a new line
        self._written = False

    # -- opening: nothing is written unless the file is new ----------------------------------------

    def open(self) -> Checkpoint:
        try:
            self._open()
        except BaseException:
            self._close_file()
            raise
        return self

    def _open(self) -> None:
        path = self.path
        try:
            if path.is_dir():
                raise ConfigurationError(
                    f"checkpoint {path} is a directory: pass a file path, such as {path / 'job.jsonl'}."
                )
            if path.exists() and not path.is_file():
                raise ConfigurationError(f"checkpoint {path} is not a regular file: pass a path such as 'job.jsonl'.")
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("ab", buffering=0)  # opening to append writes nothing
            self._lock(self._file)
            size = path.stat().st_size
            if size:
                self._read()
                self._torn = _last_byte(path) != b"\n"
        except (FileExistsError, NotADirectoryError) as exc:
            raise ConfigurationError(
                f"cannot create the checkpoint {path}: part of its folder path is a file ({exc.filename}). "
                "Choose another checkpoint path."
            ) from exc
        except OSError as exc:
            raise ConfigurationError(
                f"cannot use {path} as a checkpoint ({exc.strerror or exc}); choose another path, a file in a "
                "folder you can write to."
            ) from exc
        if not size:
            self._write_lines([{"format": _FORMAT, "parameters": self._parameters}])
        self._verified = not self._done

    def _lock(self, file: IO[bytes]) -> None:
        """Two jobs appending to one file would interleave their lines: the second one is refused."""
        if sys.platform == "win32":
            return
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(
                f"checkpoint {self.path} is in use by another job (in this process or another one): wait for "
                "it to finish, or use another checkpoint file."
            ) from None
        except OSError:  # a file system without locks: go on unlocked
            pass

    def _read(self) -> None:
        with self.path.open("rb") as lines:
            self._check_header(_json(lines.readline()))
            for line in lines:
                record = _json(line)
                index, key, output = record.get("index"), record.get("key"), record.get("output")
                if not (_is_index(index) and isinstance(key, str) and isinstance(output, dict)
                        and isinstance(output.get("generations"), list)):
                    continue  # a line cut short by a crash, or damaged: that input is simply redone
                self._done[index] = key
                if self._keep_outputs:
                    self._outputs[index] = cast(GenerateOutput, output)

    def _check_header(self, header: dict[str, Any]) -> None:
        path, version, saved = self.path, header.get("format"), header.get("parameters")
        if not isinstance(version, str) or not version.startswith(_PREFIX):
            raise ConfigurationError(
                f"{path} is not a vllmclient checkpoint (its first line is not a checkpoint header); "
                "choose another file."
            )
        if version == _FORMAT_1 and isinstance(saved, str):
            if saved != self._fingerprint_1:
                raise ConfigurationError(
                    f"{path} was written with other generation parameters (num_generations, sampling, model or "
                    "template) by an older vllmclient, which kept only their fingerprint, so it cannot say which "
                    "differs; resume with the same ones, or use a new checkpoint file."
                )
            return
        if version not in (_FORMAT, _FORMAT_1):
            raise ConfigurationError(
                f"{path} was written by a newer version of vllmclient ({version}); upgrade vllmclient to resume "
                "it, or use a new checkpoint file."
            )
        if not isinstance(saved, dict):
            raise ConfigurationError(
                f"{path} is a vllmclient checkpoint whose header is damaged (its parameters are missing); use a "
                "new checkpoint file."
            )
        if _dumps(_canonical(saved)) != _dumps(self._parameters):
            differences = _differences(saved, self._parameters) or ["(their values are not comparable)"]
            raise ConfigurationError(
                f"{path} was written with other generation parameters: {'; '.join(differences)}. Resume with the "
                "same ones, or use a new checkpoint file for these."
            )

    # -- running ---------------------------------------------------------------------------------

    def pending(self, items: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        """The inputs still to send, as ``(index, conversation)``; saved ones are compared and skipped."""
        last = max(self._done, default=-1)
        for index, item in enumerate(items):
            key = self._done.pop(index, None)
            if key is None:
                self._sent[index] = fingerprint(as_conversation(item))
                yield index, item
                continue
            if key != fingerprint(as_conversation(item)):
                raise ConfigurationError(
                    f"input {index} differs from the one saved in {self.path}: the checkpoint belongs to other "
                    "inputs (or their order changed). It was left as it is; use a new checkpoint file for these inputs."
                )
            if self._keep_outputs:
                self._restored.append((index, self._outputs.pop(index)))
            if index == last:
                self._verified = True
        self._verified = True

    async def settled(self, batches: AsyncGenerator[Batch]) -> AsyncGenerator[Batch]:
        """Save each batch of new results and pass it on, with the saved results met meanwhile.

        Inputs are read lazily, so results of new inputs can come back before a later input turns out
        to differ from the saved one. Until every saved input has been compared, results are held
        back: a refused checkpoint is never written to, and nothing comes out of a refused job.
        """
        held: Batch = []
        try:
            async for batch in batches:
                held += self._restored
                self._restored.clear()
                held += batch
                if self._verified and held:
                    self._save(held)
                    yield held
                    held = []
            held += self._restored  # the inputs ended: every saved one was compared
            self._restored.clear()
            if held:
                self._save(held)
                yield held
        finally:
            await batches.aclose()

    def _save(self, batch: Batch) -> None:
        records = []
        for index, output in batch:
            key = self._sent.pop(index, None)  # None: a saved result handed back
            if key is not None and "error" not in output:
                # ``parsed`` (structured outputs) may hold model instances: the client rebuilds it on resume.
                saved = {name: value for name, value in output.items() if name != "parsed"}
                records.append({"index": index, "key": key, "output": saved})
        self._write_lines(records)

    def _write_lines(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        assert self._file is not None
        data = "".join(json.dumps(record) + "\n" for record in records).encode()
        if self._torn:  # never append to a line cut short by a crash
            data = b"\n" + data
        try:
            while data:
                data = data[os.write(self._file.fileno(), data):]
        except OSError as exc:
            raise ConfigurationError(
                f"could not write to the checkpoint {self.path} ({exc.strerror or exc}); the results saved so far "
                "are kept. Free some space (or fix the file's permissions) and run the same call again to resume."
            ) from exc
        self._torn = False
        self._written = True

    def close(self) -> None:
        file = self._file
        if file is None:
            return
        try:
            if self._written:
                os.fsync(file.fileno())
        except OSError as exc:
            raise ConfigurationError(
                f"could not save the checkpoint {self.path} to disk ({exc.strerror or exc}); run the same call "
                "again to redo what is missing."
            ) from exc
        finally:
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()  # also releases the lock
            self._file = None


def _local_path(tokenizer: str | None) -> str | None:
    """A local tokenizer folder however it is written (``x``, ``./x``, ``x/``); a hub repo id as is."""
    if tokenizer is not None and os.path.isdir(tokenizer):
        return str(Path(tokenizer).resolve())
    return tokenizer


def _canonical(value: Any) -> Any:
    """Equal values written differently (``1`` and ``1.0``, a tuple and a list) become the same JSON."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else float(value)
    if isinstance(value, Mapping):
        return {str(key): _canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name: saved X, now Y`` for each parameter that differs, request fields named as generate() takes them."""

    def flat(parameters: dict[str, Any]) -> dict[str, Any]:
        request = parameters.get("request")
        names: dict[str, Any] = {}
        if isinstance(request, dict):
            names.update((_CALLER_NAMES.get(str(k), str(k)), v) for k, v in request.items())
        names.update((k, v) for k, v in parameters.items() if k != "request")
        return names

    before, after = flat(_canonical(saved)), flat(now)
    missing = object()
    lines = []
    for name in [*before, *(name for name in after if name not in before)]:
        old, new = before.get(name, missing), after.get(name, missing)
        if old is missing or new is missing or _dumps(old) != _dumps(new):
            lines.append(f"{name}: saved {_shown(old, missing)}, now {_shown(new, missing)}")
    return lines


def _shown(value: Any, missing: object) -> str:
    if value is missing:
        return "not set"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_index(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1)


def _json(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:  # includes bytes that are not UTF-8
        return {}
    return value if isinstance(value, dict) else {}
