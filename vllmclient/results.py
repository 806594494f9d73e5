"""Result shapes: distilabel's ``GenerateOutput`` (so existing pipelines read ours unchanged) and the
record of a failed input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

__all__ = ["GenerateOutput", "GenerationError", "Logprob", "Statistics"]


class Logprob(TypedDict):
    """One candidate token at one position; ``rank`` (1 = best) only in ``prompt_logprobs``, as vLLM sends it."""

    token: str
    logprob: float
    rank: NotRequired[int]


class Statistics(TypedDict):
    """One entry per generation, exact counts as the server tokenized them (``None`` when unknown)."""

    input_tokens: list[int | None]
    output_tokens: list[int | None]


class GenerateOutput(TypedDict):
    """What ``agenerate`` returns for one input and ``generate`` for each input.

    ``generations``, ``finish_reasons`` and each ``statistics`` list have one entry per generation.
    ``request_id`` is the ``X-Request-Id`` of the request that produced it (find it in the server's log;
    ``None`` when nothing was sent). Present only when there is something to say:

    - ``latency``: seconds from that request's send (after any wait for a free slot) to its answer; the
      inputs packed into one request share it;
    - ``server``: when ``base_url`` lists several servers, the one that answered (its ``.../v1`` address);

    - ``logprobs``: when requested; per generation, per generated token, the sampled token then the top ones;
    - ``prompt_logprobs``: when requested; per prompt token (``None`` for the first), the prompt's own token
      then the top ones, each with its ``rank``;
    - ``tool_calls``: per generation, the OpenAI tool calls the server's tool parser found, or ``None``;
    - ``reasoning``: per generation, the thinking text the server's reasoning parser split off, or ``None``;
    - ``parsed`` and ``validation_errors``: when ``structured_outputs`` was given; per generation, the
      parsed value (a dict or list for a JSON schema, a model instance for a pydantic class, the text for
      a regex, a choice or a grammar) or ``None`` when invalid, and ``None`` or why it is invalid (see
      ``vllmclient.structured``). Generations re-asked (``structured_outputs_retries``) replace the
      invalid ones in place; ``request_id`` stays the first request's;
    - ``answer``: only for job files (``vllmclient.jobs``): the server's JSON answer as if this input had been
      sent alone (its own choices, indexed from 0, and its own ``usage``);
    - ``error``: the input failed (its generations are then ``None``).
    """

    generations: list[str | None]
    statistics: Statistics
    finish_reasons: list[str | None]
    request_id: str | None
    latency: NotRequired[float]
    server: NotRequired[str]
    logprobs: NotRequired[list[list[list[Logprob]]]]
    prompt_logprobs: NotRequired[list[list[Logprob] | None]]
    tool_calls: NotRequired[list[list[dict[str, Any]] | None]]
    reasoning: NotRequired[list[str | None]]
    parsed: NotRequired[list[Any]]
    validation_errors: NotRequired[list[str | None]]
    answer: NotRequired[dict[str, Any]]
    error: NotRequired[GenerationError]


@dataclass(frozen=True)
class GenerationError:
    """Why one input of a bulk call failed; the other inputs are unaffected."""

    index: int
    type: str
    message: str
    status_code: int | None = None
    request_id: str | None = None
    exception: BaseException | None = None

    @classmethod
    def from_exception(cls, index: int, exc: BaseException) -> GenerationError:
        return cls(
            index=index,
            type=exc.__class__.__name__,
            message=str(exc),
            status_code=getattr(exc, "status_code", None),
            request_id=getattr(exc, "request_id", None),
            exception=exc,
        )

    def __repr__(self) -> str:
        status = f", status_code={self.status_code}" if self.status_code is not None else ""
        return f"GenerationError(index={self.index}, type={self.type!r}{status}, message={self.message!r})"


def empty_output(num_generations: int, request_id: str | None = None) -> GenerateOutput:
    """An output with ``None`` in every per-generation slot, to be filled in (or left, on failure)."""
    nones: list[Any] = [None] * num_generations
    return {
        "generations": list(nones),
        "statistics": {"input_tokens": list(nones), "output_tokens": list(nones)},
        "finish_reasons": list(nones),
        "request_id": request_id,
    }


def failed_output(num_generations: int, error: GenerationError) -> GenerateOutput:
    output = empty_output(num_generations, error.request_id)
    output["error"] = error
    return output


# Per-generation entries (and what an absent list holds), for replacing some generations with others.
_PER_GENERATION: dict[str, Any] = {
    "generations": None, "finish_reasons": None, "logprobs": [], "tool_calls": None, "reasoning": None,
    "parsed": None, "validation_errors": None,
}


def replace_generations(output: GenerateOutput, slots: list[int], other: GenerateOutput) -> None:
    """Put ``other``'s generations (one per slot, in order) in ``output``'s ``slots``, with everything
    that goes with each (finish reason, token counts, logprobs, tool calls, reasoning, parsed value)."""
    n = len(output["generations"])
    target: dict[str, Any] = output  # type: ignore[assignment]
    source: dict[str, Any] = other  # type: ignore[assignment]
    for key, absent in _PER_GENERATION.items():
        if key not in target and key not in source:
            continue
        values = target.setdefault(key, [_blank(absent) for _ in range(n)])
        for position, slot in enumerate(slots):
            values[slot] = source[key][position] if key in source else _blank(absent)
    for key in ("input_tokens", "output_tokens"):
        for position, slot in enumerate(slots):
            output["statistics"][key][slot] = other["statistics"][key][position]  # type: ignore[literal-required]


def _blank(absent: Any) -> Any:
    return list(absent) if isinstance(absent, list) else absent
