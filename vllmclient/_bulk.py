"""A bulk run: inputs → the engine's stream → checkpoint → progress → results.

The one room that ``generate``, ``generate_outputs`` and ``aiter_generate`` drive (and that job files
and integrations can drive): it reads the inputs lazily, saves and restores results through a
checkpoint, shows progress, and never lets a failed input go unnoticed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Never

from .errors import GenerationFailedError, InvalidInputError, failure_lines
from .results import GenerateOutput

if TYPE_CHECKING:
    from tqdm.std import tqdm as ProgressBar

    from ._engine import Engine, Prepare
    from ._request import Request
    from .checkpoint import Checkpoint
    from .structured import StructuredSpec

__all__ = ["check_bulk_arguments", "collect", "log_failures", "run"]

logger = logging.getLogger("vllmclient")

Batches = AsyncGenerator[list[tuple[int, GenerateOutput]]]

_PROGRESS_THRESHOLD = 100
"""A progress bar by default from this many inputs (and for iterables of unknown length)."""


def check_bulk_arguments(inputs: Any, progress: Any) -> None:
    """Refuse, before connecting, what cannot be a bulk call's inputs or progress setting."""
    if isinstance(inputs, (str, bytes, Mapping)) or not isinstance(inputs, Iterable):
        got = "None" if inputs is None else type(inputs).__name__
        raise InvalidInputError(
            f"inputs must be a list (or any iterable) of conversations, got {got}. For one conversation, "
            "pass [conversation]; each conversation is a list of {'role': ..., 'content': ...} dicts."
        )
    if progress not in (True, False, None):
        raise InvalidInputError(
            f"progress={progress!r} is invalid: expected True, False or None (a bar for 100 inputs or more)."
        )


async def run(
    engine: Engine,
    request: Request,
    prepare: Prepare,
    inputs: Iterable[Any],
    *,
    progress: bool | None,
    checkpoint: Checkpoint | None,
) -> Batches:
    """Batches of ``(index, output)`` as packs complete; runs on the client's private loop.

    With a checkpoint, each batch is saved as it completes and inputs saved by an earlier run are not
    sent (their results come back too when the checkpoint keeps outputs, for ``generate``).
    """
    read = inputs if isinstance(inputs, (list, tuple)) else _read(inputs)
    indexed: Iterable[tuple[int, Any]] = enumerate(read)
    saved = checkpoint.open() if checkpoint is not None else None
    if saved is not None:
        indexed = saved.pending(read)
    bar = _progress_bar(inputs, progress)
    errors = 0
    batches = engine.stream(indexed, request, prepare)
    if saved is not None:
        batches = saved.settled(batches)  # saves each batch; results saved earlier come back too
        if request.structured is not None:
            batches = _reparsed(batches, request.structured)
    try:
        async for batch in batches:
            if bar is not None:
                failed = sum(1 for _, output in batch if "error" in output)
                if failed:
                    errors += failed
                    bar.set_postfix(errors=errors, refresh=False)
                bar.update(len(batch))
            yield batch
    finally:
        await batches.aclose()  # stops the engine's requests now
        if bar is not None:
            bar.close()
        if saved is not None:
            saved.close()


async def collect(batches: Batches, *, strict: bool) -> list[GenerateOutput]:
    """Every output in input order; ``strict``: raise ``GenerationFailedError`` (holding them all) if any failed."""
    results: dict[int, GenerateOutput] = {}
    try:
        async for batch in batches:
            for index, output in batch:
                results[index] = output
    finally:
        await batches.aclose()
    ordered = [results[index] for index in range(len(results))]
    if strict:
        failures = [output["error"] for output in ordered if "error" in output]
        if failures:
            raise GenerationFailedError(failures, len(ordered), results=ordered)
    return ordered


def log_failures(outputs: list[GenerateOutput], level: int, note: str) -> None:
    """Failed inputs are never silent: how many, and the first reasons."""
    failures = [output["error"] for output in outputs if "error" in output]
    if failures and logger.isEnabledFor(level):
        logger.log(level, "vllmclient: %d of %d inputs failed; %s:\n%s", len(failures), len(outputs), note,
                   "\n".join(failure_lines(failures, 3)))


def _read(inputs: Iterable[Any]) -> Iterator[Any]:
    """The inputs one by one; an error of the iterable itself (a generator reading a file) ends the call as ours."""
    index = 0
    try:
        for item in inputs:
            yield item
            index += 1
    except Exception as exc:
        raise InvalidInputError(
            f"inputs raised {exc.__class__.__name__} ({exc}) when reading input {index}, so the call stopped there. "
            "Fix the iterable; with checkpoint=... a rerun sends only what did not finish."
        ) from exc


async def _reparsed(batches: Batches, spec: StructuredSpec) -> Batches:
    """A checkpoint does not save ``parsed`` (it may hold model instances): rebuild it for restored results."""
    try:
        async for batch in batches:
            for _, output in batch:
                if "parsed" not in output:
                    spec.annotate(output)
            yield batch
    finally:
        await batches.aclose()


def _progress_bar(inputs: Iterable[Any], progress: bool | None) -> ProgressBar[Never] | None:
    total = len(inputs) if isinstance(inputs, Sequence) else None
    if progress is None:
        progress = total is None or total >= _PROGRESS_THRESHOLD
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="vllmclient", unit="input", dynamic_ncols=True)
