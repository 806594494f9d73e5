"""Job files: a JSON-lines file of requests in, one run_batch record per line out, resumable.

Input lines are vLLM's / OpenAI's batch format (``custom_id``, ``method``, ``url``, ``body``; ``url``
``/v1/chat/completions`` or ``/v1/completions``) or plain conversations (``{"custom_id": ..., "messages":
[...]}``, or a bare list of messages), which take the call's sampling parameters. Lines whose bodies differ
only in the prompt (or messages) form a group, and each group runs through the client's engine as
``generate`` does (packed, split on a bad prompt); groups run at once, sharing ``max_concurrency``.
Each line ends as exactly one output record, written as soon as it finishes (``_job_output``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ._job_output import JobOutput, identity, sidecar_path
from ._job_request import Call, plain_call, prompt_kind
from ._responses import read
from .client import ClientvLLM
from .errors import APIError, BadRequestError, ConfigurationError
from .params import parse_params
from .results import GenerateOutput, GenerationError

__all__ = ["JobSummary", "run_batch_file"]

logger = logging.getLogger("vllmclient")

_KEYS_BATCH = frozenset({"custom_id", "method", "url", "body"})
_KEYS_PLAIN = frozenset({"custom_id", "messages"})
_BODY_NAMES = {"max_new_tokens": "max_tokens", "num_generations": "n"}  # generate's parameters in a body's names


@dataclass
class JobSummary:
    """What a run of a job file did. ``failed`` counts this run's error records by error type."""

    input: str
    output: str
    inputs: int = 0  # lines holding a request (blank lines aside)
    already_done: int = 0  # records kept from earlier runs
    failed_before: int = 0  # of those, error records (lasting failures: a bad line, a 400)
    done: int = 0  # successful records written by this run
    failed: dict[str, int] = field(default_factory=dict)
    retryable: int = 0  # of the failed: server-side or transient failures, which a rerun runs again
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0

    @property
    def prompts_per_second(self) -> float:
        finished = self.done + sum(self.failed.values())
        return finished / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["prompts_per_second"] = round(self.prompts_per_second, 2)
        data["seconds"] = round(self.seconds, 3)
        return data

    def __str__(self) -> str:
        failed = sum(self.failed.values())
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.failed.items()))
        lines = [
            f"{self.inputs} inputs: {self.already_done} done before"
            + (f" ({self.failed_before} of them failed)" if self.failed_before else "")
            + f", {self.done} done now, {failed} failed"
            + (f" ({reasons})" if reasons else ""),
            (f"{self.prompt_tokens} prompt tokens, {self.output_tokens} output tokens; {self.seconds:.1f} s, "
             f"{self.prompts_per_second:.1f} prompts/s"),
        ]
        if self.retryable:
            lines.append(f"{self.retryable} failed for transient reasons (server down, timeout, 5xx): run the same "
                         "command again to retry them")
        return "\n".join(lines)


@dataclass
class _Group:
    """Lines sharing a body. Its ``Call`` is built when it runs (from its first line): a job whose every line has
    its own body (say its own seed) holds only the lines' places, not a request per line."""

    url: str | None
    call: Call | None = None
    lines: list[tuple[int, int]] = field(default_factory=list)  # (line number, byte offset)
    custom_ids: dict[int, str] = field(default_factory=dict)


class _Input:
    """The input, read again line by line at the offsets planned: it must not change meanwhile (rewritten in place,
    the offsets would hold other lines, whose answers would be recorded under the planned lines' custom_ids)."""

    def __init__(self, file: IO[bytes], path: Path) -> None:
        self.file, self.path = file, path
        self.stamp = self._stamp()

    def _stamp(self) -> tuple[int, int]:
        status = os.fstat(self.file.fileno())
        return status.st_size, status.st_mtime_ns

    def check(self) -> None:
        if self._stamp() != self.stamp:
            raise ConfigurationError(
                f"the input {self.path} changed while the job ran, so its lines are no longer the ones the job "
                "planned; the job stopped, and the records it wrote answer the lines as they were. Put the input "
                "back as it was and run the same command again to resume, or start over with the new input "
                "in another output file."
            )

    def line(self, offset: int) -> bytes:
        """The line at ``offset``; checked after it is read, so a change just before the read is seen."""
        self.file.seek(offset)
        line = self.file.readline()
        self.check()
        return line


class _LineError(Exception):
    """A line that is not a request; its record says why."""


def run_batch_file(
    client: ClientvLLM,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    progress: bool = True,
    num_generations: int = 1,
    **params: Any,
) -> JobSummary:
    """Run every line of the JSON-lines file ``input`` through ``client``; append one run_batch record per line to
    ``output`` (``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``).

    ``params`` (``generate``'s sampling parameters, e.g. ``max_new_tokens=256, temperature=0.7``) and
    ``num_generations`` apply to plain lines; batch-format lines carry their own in ``body`` (OpenAI names).
    A line that is not a request, a duplicate ``custom_id``, a body field the client cannot carry and a failed
    request become that line's error record (``error``: ``message`` naming the line, ``type``, ``code``,
    ``param``, ``line``, ``retryable``); the job goes on. Run again with the same arguments to resume: lines
    with a record are skipped, records of transient failures (server unreachable, timeout, 5xx) are replaced.
    Raises ``ConfigurationError`` for an output written for another input or options (nothing is written to
    it), or in use by another job; ``KeyboardInterrupt`` stops it within seconds, every finished line kept.
    """
    started = time.monotonic()
    parse_params(params)  # a bad parameter fails here, before the output is touched
    source, target = Path(input).expanduser(), Path(output).expanduser()
    try:
        reading = source.open("rb")
    except OSError as exc:
        raise ConfigurationError(f"cannot read the input {source} ({exc.strerror or exc}).") from exc
    summary = JobSummary(str(source), str(target))
    with reading:
        if not reading.seekable():
            raise ConfigurationError(f"the input {source} is not a regular file (a pipe?): a job reads it twice, to "
                                     "fingerprint it and then line by line, and resumes by its contents; save it to a "
                                     "file and pass that.")
        if any(path.exists() and path.samefile(source) for path in (target, sidecar_path(target))):
            raise ConfigurationError(f"the output {target} is the input {source}: a job appends its records to the "
                                     "output, so choose another output file.")
        source_file = _Input(reading, source)
        digest = _digest(reading)
        options = {  # what decides the answers; not the server's address, nor how fast it is asked; nor the model
            # as named (given or the server's default): the model that answers is kept once known (served_model)
            "tokenizer": _local(client.tokenizer), "tokenizer_revision": client.tokenizer_revision,
            "magpie_pre_query_template": client.magpie_pre_query_template if client.use_magpie_template else None,
            "generation_kwargs": client.generation_kwargs,
            "structured_output": client.structured_output, "num_generations": num_generations, "params": params,
        }
        job = JobOutput(target, identity(digest, source.resolve(), options))
        job.check()
        try:
            client.load()
            job.served(client.model_name)
            plain = plain_call(client, {**params, "num_generations": num_generations})
            job.begin()
            groups, failures = _plan(_lines(reading), job, plain, summary)
            source_file.check()
            _warn_unused(groups, params, num_generations)
            job.write(failures)
            _count(summary, failures)
            pending = sum(len(group.lines) for group in groups.values())
            bar = _bar(pending, progress)
            try:
                client._loop.run(_run(client, source_file, groups, job, summary, bar))
            finally:
                if bar is not None:
                    bar.close()
                summary.seconds = time.monotonic() - started
        finally:
            job.close()
    return summary


def _warn_unused(groups: dict[Any, _Group], params: dict[str, Any], num_generations: int) -> None:
    """Sampling options given for the job do not reach batch lines (their body decides): say so, once, in the
    body's (vLLM's) names, which are the command line's too."""
    given = [_BODY_NAMES.get(name, name) for name in [*params, *(["num_generations"] if num_generations != 1 else [])]]
    batch = sum(len(group.lines) for group in groups.values() if group.url is not None)
    if given and batch:
        logger.warning("vllmclient: %s apply to plain lines only; the input's %d batch lines use their own body's "
                       "fields (put them there to change those lines).", ", ".join(given), batch)


def _digest(file: IO[bytes]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for block in iter(lambda: file.read(1 << 20), b""):
        digest.update(block)
    file.seek(0)
    return digest.hexdigest()


def _lines(file: IO[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """The file's non-blank lines as ``(number, offset, bytes)``, numbers from 1."""
    file.seek(0)
    offset = 0
    for number, line in enumerate(file, start=1):
        if line.strip():
            yield number, offset, line
        offset += len(line)


def _plan(lines: Iterator[tuple[int, int, bytes]], job: JobOutput, plain: Call,
          summary: JobSummary) -> tuple[dict[Any, _Group], list[dict[str, Any]]]:
    """Group the lines still to run; error records for the lines that cannot run."""
    groups: dict[Any, _Group] = {}
    failures: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, offset, raw in lines:
        summary.inputs += 1
        default_id = f"line-{number}"
        done = number in job.done_lines
        failure: dict[str, Any] | None = None
        try:
            custom_id, url, body, payload = parse_line(raw, default_id)
        except _LineError as exc:  # its custom_id is still taken: a later line with it would be a second record
            custom_id, url, body = _custom_id_of(raw, default_id), None, None
            failure = failure_record(custom_id, number, "InvalidLineError", str(exc))
        else:
            if custom_id in seen:
                failure = failure_record(custom_id, number, "DuplicateCustomIdError",
                                         f"custom_id {custom_id!r} was used by an earlier line; each line needs its "
                                         "own (only the first was run)")
        seen.add(custom_id)
        if done or (failure is None and custom_id in job.done_ids):
            summary.already_done += 1
            summary.failed_before += done
            continue
        if failure is not None:
            failures.append(failure)
            continue
        key: Any = None
        if url is not None:
            shared = json.dumps([url, prompt_kind(url, payload), body], sort_keys=True).encode()
            key = hashlib.blake2b(shared, digest_size=16).digest()
        if number in job.alone:  # a 500 failed it with its pack last time: its own request now
            key = (key, number)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(url, plain if url is None else None)
        group.lines.append((number, offset))
        group.custom_ids[number] = custom_id
    return groups, failures


async def _run(client: ClientvLLM, source: _Input, groups: dict[Any, _Group], job: JobOutput,
               summary: JobSummary, bar: Any) -> None:
    """Run the groups, at most ``max_concurrency`` at once (each holds at least a sequence when it sends)."""
    engine = client._engine
    assert engine is not None
    queue = iter(groups.values())

    def payloads(group: _Group) -> Iterator[tuple[int, Any]]:
        for number, offset in group.lines:
            yield number, parse_line(source.line(offset), "")[3]

    async def worker() -> None:
        for group in queue:
            call = group.call
            if call is None:
                _, url, body, _ = parse_line(source.line(group.lines[0][1]), "")
                assert url is not None and body is not None
                call = Call.of(client, url, body)
            if call.error is not None:
                records = [failure_record(group.custom_ids[number], number, type(call.error).__name__,
                                          str(call.error), exc=call.error) for number, _ in group.lines]
                _finish(job, summary, records, bar)
                continue
            assert call.request is not None and call.prepare is not None
            stream = engine.stream(payloads(group), call.request, call.prepare)
            try:
                async for batch in stream:
                    records = [_record(group.custom_ids[number], number, output, call.finish)
                               for number, output in batch]
                    _finish(job, summary, records, bar)
            finally:
                await stream.aclose()

    workers = [asyncio.ensure_future(worker()) for _ in range(min(len(groups), engine.capacity.limit))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def _finish(job: JobOutput, summary: JobSummary, records: list[dict[str, Any]], bar: Any) -> None:
    job.write(records)
    _count(summary, records)
    if bar is not None:
        failed = sum(summary.failed.values())
        if failed:
            bar.set_postfix(failed=failed, refresh=False)
        bar.update(len(records))


def _count(summary: JobSummary, records: list[dict[str, Any]]) -> None:
    for record in records:
        error = record["error"]
        if error is None:
            summary.done += 1
            usage = record["response"]["body"].get("usage") or {}
            summary.prompt_tokens += usage.get("prompt_tokens") or 0
            summary.output_tokens += usage.get("completion_tokens") or 0
        else:
            summary.failed[error["type"]] = summary.failed.get(error["type"], 0) + 1
            summary.retryable += bool(error["retryable"])


def parse_line(raw: bytes, default_id: str) -> tuple[str, str | None, dict[str, Any] | None, Any]:
    """``(custom_id, url, body without the prompt, prompt or messages)``; url and body are None for a plain line."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise _LineError(f"not a JSON value ({exc})") from None
    except RecursionError:
        raise _LineError("its JSON is nested too deeply to read; flatten it") from None
    if isinstance(value, list):
        return default_id, None, None, value
    if not isinstance(value, dict):
        raise _LineError(f"expected a JSON object or a list of messages, got {type(value).__name__}")
    custom_id = value.get("custom_id", default_id)
    if not isinstance(custom_id, str) or not custom_id:
        raise _LineError(f"custom_id must be a non-empty string, got {json.dumps(custom_id)[:80]}")
    if "body" in value or "url" in value:
        unknown = sorted(set(value) - _KEYS_BATCH)
        if unknown:
            raise _LineError(f"unknown key(s) {', '.join(unknown)}; a batch line has custom_id, method, url and body")
        if value.get("method", "POST") != "POST":
            raise _LineError(f"method {json.dumps(value.get('method'))[:40]} is not supported: use \"POST\"")
        url, body = value.get("url"), value.get("body")
        if url not in ("/v1/chat/completions", "/v1/completions"):
            raise _LineError(f"url {json.dumps(url)[:80]} is not supported: use \"/v1/chat/completions\" or "
                             "\"/v1/completions\"")
        if not isinstance(body, dict):
            raise _LineError("body must be a JSON object (the request's fields)")
        name = "messages" if url == "/v1/chat/completions" else "prompt"
        if name not in body:
            raise _LineError(f"the body has no {name!r} (required by {url})")
        body = dict(body)
        return custom_id, url, body, body.pop(name)
    unknown = sorted(set(value) - _KEYS_PLAIN)
    if "messages" not in value or unknown:
        raise _LineError(
            "expected a batch line ({\"custom_id\", \"method\", \"url\", \"body\"}), {\"custom_id\", \"messages\"} "
            f"or a list of messages; got the keys {', '.join(sorted(value))[:120]}"
        )
    return custom_id, None, None, value["messages"]


def _custom_id_of(raw: bytes, default_id: str) -> str:
    try:
        custom_id = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError, RecursionError):
        return default_id
    return custom_id if isinstance(custom_id, str) and custom_id else default_id


def _record(custom_id: str, number: int, output: GenerateOutput, finish: Callable[[dict[str, Any]], dict[str, Any]]
            ) -> dict[str, Any]:
    error = output.get("error")
    if error is not None:
        return failure_record(custom_id, number, error.type, error.message, error=error)
    try:
        body = read(finish, output["answer"])
    except APIError as exc:  # an answer of a shape the client cannot reshape: this line fails, not the job
        return failure_record(custom_id, number, type(exc).__name__, exc.message, exc=exc)
    return {
        "id": f"vllmclient-{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": output["request_id"], "body": body},
        "error": None,
    }


def failure_record(custom_id: str, number: int, kind: str, message: str, *, error: GenerationError | None = None,
                   exc: BaseException | None = None) -> dict[str, Any]:
    """A line's error record; ``retryable``: a rerun runs it again (the server's trouble, not the line's)."""
    exc = error.exception if error is not None else exc
    status = error.status_code if error is not None else getattr(exc, "status_code", None)
    request_id = error.request_id if error is not None else None
    body = getattr(exc, "body", None)
    words = f"input {number}"
    message = f"line {number}{message[len(words):]}" if message.startswith(words) else f"line {number}: {message}"
    return {
        "id": f"vllmclient-{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None if status is None else {"status_code": status, "request_id": request_id, "body": None},
        "error": {
            "message": message, "type": kind, "code": status,
            "param": body.get("param") if isinstance(body, dict) else None,
            "line": number, "retryable": _retryable(exc),
        },
    }


def _retryable(exc: BaseException | None) -> bool:
    """The server's trouble (unreachable, lost, timed out, 5xx, 429, an unreadable answer, a key or model it
    stopped taking mid-job: a rerun loads it again first) or a local limit (out of file descriptors): worth
    sending again. Not a line the server refused (400)."""
    if isinstance(exc, ConfigurationError):
        return True
    return isinstance(exc, APIError) and not isinstance(exc, BadRequestError)


def _local(tokenizer: str | None) -> str | None:
    return str(Path(tokenizer).resolve()) if tokenizer is not None and os.path.isdir(tokenizer) else tokenizer


def _bar(total: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="vllmclient run", unit="line", dynamic_ncols=True)
