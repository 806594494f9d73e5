"""The output file of a job: run_batch lines only, appended as they finish, resumed by ``custom_id``.

What the job was run with (a fingerprint of the input file and the options) lives beside it, in
``OUTPUT.job.json``, which is also locked while a job runs, so that the output itself stays pure
run_batch lines. A rerun is checked against it before anything is written.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from .errors import ConfigurationError

if sys.platform != "win32":
    import fcntl

__all__ = ["JobOutput", "identity", "sidecar_path"]

_FORMAT = "vllmclient-job-1"


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".job.json")


class JobOutput:
    """``check()`` refuses another job's output and tells what is done, writing nothing; ``begin()`` repairs the
    file and opens it; ``write()`` appends records."""

    def __init__(self, path: Path, identity: Mapping[str, Any]) -> None:
        self.path = path
        self.sidecar = sidecar_path(path)
        self.identity = dict(identity)
        self.done_ids: set[str] = set()  # custom_ids with a result
        self.done_lines: set[int] = set()  # line numbers with a lasting error record
        self.dropped = 0  # records of an earlier run taken out to be run again (transient failures, a torn line)
        self.alone: set[int] = set()  # of those, lines a 500 failed: run one per request (see _read_done)
        self._lock: IO[bytes] | None = None
        self._locked = False  # this job holds the lock: the sidecar is its own to remove
        self._saved = False
        self._before: dict[str, Any] = {}  # the identity an earlier run saved
        self._fd: int | None = None

    def check(self) -> None:
        try:
            self._check_file()
        except BaseException:
            self.close()
            raise

    def _check_file(self) -> None:
        path = self.path
        if path.is_dir():
            raise ConfigurationError(f"output {path} is a directory: pass a file path, such as {path / 'out.jsonl'}.")
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):  # /dev/null, /dev/stdout, a pipe
            raise ConfigurationError(f"output {path} is not a regular file: a job appends its records to the output and "
                                     "resumes from what it holds; pass a file path, such as out.jsonl.")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = self.sidecar.open("a+b")
        except OSError as exc:
            raise ConfigurationError(f"cannot write the output {path} ({exc.strerror or exc}); choose another path.") from exc
        if sys.platform != "win32":
            try:
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigurationError(
                    f"output {path} is in use by another job: wait for it to finish, or choose another output."
                ) from None
            except OSError:  # a file system without locks
                pass
        self._locked = True
        self._lock.seek(0)
        has_output = path.exists() and path.stat().st_size > 0
        self._saved = has_output and bool(self._lock.read(1))  # an identity without output guards nothing
        self._lock.seek(0)
        if self._saved:
            self._check(self._lock.read())
        elif has_output:
            raise ConfigurationError(
                f"output {path} already holds lines that no `vllmclient run` wrote ({self.sidecar} is missing), so "
                "it cannot be resumed; it was left as it is. Choose another output file."
            )
        if has_output:
            self._read_done()

    def begin(self) -> None:
        """From here the job writes: its identity (a new job), the output without the records to run again."""
        assert self._lock is not None
        if not self._saved:
            os.ftruncate(self._lock.fileno(), 0)
            self._lock.write(json.dumps(self.identity, indent=1, default=str).encode() + b"\n")
            self._lock.flush()
            os.fsync(self._lock.fileno())
        if self.dropped:  # rewritten whole, then swapped in: a crash meanwhile leaves the old file
            spare = self.path.with_name(self.path.name + ".rewrite")
            with self.path.open("rb") as lines, spare.open("wb") as file:
                file.writelines(line for line in lines if _kept(_record(line)))
                file.flush()
                os.fsync(file.fileno())
            os.replace(spare, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _check(self, saved: bytes) -> None:
        try:
            before = json.loads(saved)
        except ValueError:
            before = None
        if isinstance(before, dict):
            self._before = before
        if not isinstance(before, dict) or before.get("format") != _FORMAT:
            raise ConfigurationError(
                f"{self.sidecar} is not a vllmclient job file (or a damaged one), so {self.path} cannot be resumed; "
                "both were left as they are. Choose another output file."
            )
        differences: list[str] = []
        if before.get("input") != self.identity["input"]:
            differences.append(f"input file {before.get('input_path')} then, {self.identity['input_path']} now, "
                               "with other contents")
        options, given = self.identity["options"], before.get("options")
        then: dict[str, Any] = given if isinstance(given, dict) else {}
        differences += _differences(then, options)
        if differences:
            raise ConfigurationError(
                f"output {self.path} was written for another job ({'; '.join(differences)}); it was left as it is. "
                "Run the same input and options to resume it, or choose another output file."
            )

    def served(self, model: str) -> None:
        """Once the client knows the served model: the records kept and the lines run now answered by one model."""
        then = self._before.get("served_model")
        if then is not None and then != model:
            raise ConfigurationError(
                f"output {self.path} holds answers of the model {then!r}, and the server now serves {model!r}; it was "
                f"left as it is. Resume it against a server of {then!r}, or choose another output file."
            )
        self.identity["served_model"] = model

    def _read_done(self) -> None:
        """Note what is done, and count the lines to take out: torn or damaged, or a transient failure."""
        with self.path.open("rb") as lines:
            for line in lines:
                record = _record(line)
                if not _kept(record):
                    self.dropped += 1
                    error = record.get("error") if record is not None else None
                    if isinstance(error, dict) and error.get("code") == 500 and isinstance(error.get("line"), int):
                        # A prompt the server fails fails its whole pack: packed alike again, the other lines
                        # would fail with it on every rerun. Alone, only the guilty line fails again.
                        self.alone.add(error["line"])
                    continue
                assert record is not None
                error = record.get("error")
                number = error.get("line") if isinstance(error, dict) else None
                if isinstance(number, int) and not isinstance(number, bool):
                    self.done_lines.add(number)
                else:
                    self.done_ids.add(record["custom_id"])

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append whole lines at once (one ``write``), so a kill leaves at most the last one torn."""
        assert self._fd is not None
        data = b"".join(map(_line, records))
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            raise ConfigurationError(
                f"could not write to {self.path} ({exc.strerror or exc}); the records written so far are kept. Free "
                "some space and run the same command again to resume."
            ) from exc

    def close(self) -> None:
        began = self._fd is not None
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
        if self._lock is not None:
            if self._locked and not began and os.fstat(self._lock.fileno()).st_size == 0:
                self.sidecar.unlink(missing_ok=True)  # made only to lock it: the job never began (not another job's)
            self._lock.close()  # releases the lock
            self._lock = None


def identity(input_digest: str, input_path: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    return {"format": _FORMAT, "input": input_digest, "input_path": str(input_path), "options": dict(options)}


def _line(record: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:  # a lone surrogate from the input ("\\ud800" in its JSON): kept escaped, as it came
        return (json.dumps(record) + "\n").encode()


def _record(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None  # cut short by a kill
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
        return None
    return record


def _kept(record: dict[str, Any] | None) -> bool:
    """A whole record, not one of a transient failure (run again)."""
    if record is None:
        return False
    error = record.get("error")
    return not (isinstance(error, dict) and error.get("retryable") is True)


def _differences(then: Mapping[str, Any], now: Mapping[str, Any], unset: Any = None) -> list[str]:
    """``name: X then, Y now`` per option that differs; generate's parameters (``params``) one by one, by their own
    names, so that the one changed is named (and, on the command line, shown as its option)."""
    found: list[str] = []
    for name in sorted(set(then) | set(now)):
        before, after = then.get(name, unset), now.get(name, unset)
        if name == "params" and isinstance(before, dict) and isinstance(after, dict):
            found += _differences(before, after, _UNSET)
        elif _canonical(before) != _canonical(after):
            found.append(f"{name}: {_shown(before)} then, {_shown(after)} now")
    return found


_UNSET = object()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _shown(value: Any) -> str:
    if value is _UNSET:
        return "not set"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
