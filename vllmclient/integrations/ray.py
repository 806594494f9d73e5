"""Ray Data: a ``Dataset`` of conversations in, the same rows with their results out (``pip install
pyvllmclient[ray]``)::

    import ray
    from vllmclient import ClientvLLM
    from vllmclient.integrations.ray import generate

    client = ClientvLLM(base_url="http://vllm:8000/v1", tokenizer="Qwen/Qwen2.5-7B-Instruct")
    results = generate(ray.data.read_parquet("prompts/"), client, actors=4, id_column="id", max_new_tokens=256)
    results.write_parquet("results/")

Each actor holds one client (``Generate``: a sync ``__call__``; ``AsyncGenerate``: an async one, so Ray
overlaps several batches per actor on that client). The client's ``max_concurrency`` is the whole job's:
each of the ``actors`` gets its share, so N actors do not send N times as much to the server. A failed row
keeps its columns and gets ``error`` (the message, naming the row by ``id_column``) and ``error_type``; its
``generations`` are ``None``. Resume is Ray Data's own: with ``DataContext.checkpoint_config =
CheckpointConfig(id_column=..., checkpoint_path=...)``, a read → ``generate`` → write job run again skips the
rows already written; ``keep_failed=False`` leaves failed rows out of the output (logged), so a rerun retries
them. This is the one module of vllmclient that imports ray.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy
import ray.data

from ..client import ClientvLLM
from ..errors import ConfigurationError
from ..results import GenerateOutput

__all__ = ["AsyncGenerate", "Generate", "generate"]

logger = logging.getLogger("vllmclient")

RESULT_COLUMNS = ("generations", "finish_reasons", "input_tokens", "output_tokens", "request_id", "error",
                  "error_type")


class Generate:
    """A callable class for ``Dataset.map_batches``: one ``ClientvLLM`` per actor, the rows' results as columns.

    ``client`` is copied (settings only) and its ``max_concurrency`` divided by ``actors``, at least 1 each.
    ``column`` holds each row's conversation (a list of message dicts; Ray hands it over as an array, which
    the client takes). ``generation_kwargs`` are ``generate``'s (``max_new_tokens``, ``temperature``, ...).
    """

    def __init__(
        self,
        client: ClientvLLM,
        *,
        actors: int,
        column: str = "conversation",
        id_column: str | None = None,
        num_generations: int = 1,
        keep_failed: bool = True,
        **generation_kwargs: Any,
    ) -> None:
        if not isinstance(client, ClientvLLM):
            raise ConfigurationError(f"client must be a vllmclient.ClientvLLM, got {type(client).__name__}.")
        if type(actors) is not int or actors < 1:
            raise ConfigurationError(f"actors={actors!r} is invalid: the number of actors of the pool, an int >= 1.")
        self.client = copy.copy(client)
        self.client.max_concurrency = max(1, client.max_concurrency // actors)
        self.column, self.id_column, self.keep_failed = column, id_column, keep_failed
        self.num_generations, self.generation_kwargs = num_generations, generation_kwargs
        self.client.load()  # an unreachable server or a wrong tokenizer fails the actor's start, with our error

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        outputs = self.client.generate(
            self._conversations(batch), self.num_generations, progress=False, **self.generation_kwargs
        )
        return self._columns(batch, outputs)

    def _conversations(self, batch: Mapping[str, Any]) -> list[Any]:
        if self.column not in batch:
            raise ConfigurationError(
                f"the batch has no column {self.column!r} (it has {', '.join(map(repr, batch))}): pass "
                "column='<the column holding the conversations>'."
            )
        return list(batch[self.column])

    def _columns(self, batch: Mapping[str, Any], outputs: Sequence[GenerateOutput]) -> dict[str, Any]:
        """The batch's own columns, then the results: per row, one entry per generation or an error."""
        ids = list(batch[self.id_column]) if self.id_column is not None else None
        keep = [self.keep_failed or "error" not in output for output in outputs]
        columns: dict[str, Any] = {name: _kept(batch[name], keep) for name in batch}
        results: dict[str, list[Any]] = {name: [] for name in RESULT_COLUMNS}
        failed: list[str] = []
        for position, output in enumerate(outputs):
            error = output.get("error")
            message = None
            if error is not None:
                message = error.message
                if ids is not None:  # "input 3: ..." counts within the batch: name the row instead
                    row = f"{self.id_column}={_plain(ids[position])!r}"
                    prefix = f"input {error.index}"
                    message = row + message[len(prefix):] if message.startswith(prefix) else f"{row}: {message}"
                failed.append(message)
            if not keep[position]:
                continue
            results["generations"].append(output["generations"])
            results["finish_reasons"].append(output["finish_reasons"])
            results["input_tokens"].append(output["statistics"]["input_tokens"])
            results["output_tokens"].append(output["statistics"]["output_tokens"])
            results["request_id"].append(output["request_id"])
            results["error"].append(message)
            results["error_type"].append(None if error is None else error.type)
        if failed:
            logger.warning("vllmclient: %d of %d rows of a batch failed%s; first: %s", len(failed), len(outputs),
                           "" if self.keep_failed else " and were left out (a rerun retries them)", failed[0])
        return {**columns, **results}


class AsyncGenerate(Generate):
    """``Generate`` with an async ``__call__``: Ray runs several batches at once on each actor's one client,
    so the next batch is sent while the last rows of one are still being generated."""

    async def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        conversations = self._conversations(batch)
        outputs: list[Any] = [None] * len(conversations)
        results = self.client.aiter_generate(conversations, self.num_generations, progress=False,
                                             **self.generation_kwargs)
        async for index, output in results:
            outputs[index] = output
        return self._columns(batch, outputs)


def generate(
    dataset: ray.data.Dataset,
    client: ClientvLLM,
    *,
    actors: int = 2,
    batch_size: int = 256,
    column: str = "conversation",
    id_column: str | None = None,
    num_generations: int = 1,
    keep_failed: bool = True,
    **generation_kwargs: Any,
) -> ray.data.Dataset:
    """``dataset`` with each row's results as columns (see the module's docs): ``AsyncGenerate`` on a pool of
    ``actors``, ``batch_size`` rows per batch (ample: the client packs and paces them itself)."""
    return dataset.map_batches(
        AsyncGenerate,
        fn_constructor_args=(client,),
        fn_constructor_kwargs={"actors": actors, "column": column, "id_column": id_column,
                               "num_generations": num_generations, "keep_failed": keep_failed,
                               **generation_kwargs},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
    )


def _kept(values: Any, keep: list[bool]) -> Any:
    """The rows of a column to keep, in the column's own type (Ray turns a numpy column back into its Arrow type)."""
    return values if all(keep) else values[numpy.asarray(keep)]


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (for messages)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value
