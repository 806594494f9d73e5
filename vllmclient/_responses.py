"""Reading answers: vLLM's completions and chat JSON → one ``GenerateOutput`` per input.

Nothing the server sends back is dropped: texts, finish reasons, exact token counts, logprobs, prompt
logprobs, tool calls, reasoning and the request id all reach the result. Runs once per pack; per-choice
work is a few dict lookups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ._request import Request
from .errors import APIError
from .results import GenerateOutput, Logprob, empty_output

__all__ = [
    "batch_chat_outputs", "chat_logprobs", "chat_output", "completion_alone", "completion_logprobs", "completion_outputs",
    "read",
]

T = TypeVar("T")


def read(parse: Callable[..., T], data: Any, *args: Any) -> T:
    """Parse an answer; a shape we cannot read is the server's error, said plainly."""
    try:
        return parse(data, *args)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise APIError(
            f"the server's answer has an unexpected shape ({exc.__class__.__name__}: {exc}): {str(data)[:200]}"
        ) from exc


def completion_outputs(data: dict[str, Any], prompts: int, request: Request, request_id: str) -> list[GenerateOutput]:
    """Choices come prompt-major: ``index = prompt_position * n + j``."""
    n = request.n
    outputs = [empty_output(n, request_id) for _ in range(prompts)]
    usage = data.get("usage") or {}
    whole_request = prompts == 1 and n == 1  # then usage is exact for the one generation
    for choice in data["choices"]:
        position, j = divmod(choice["index"], n)
        output = outputs[position]
        output["generations"][j] = choice.get("text") or ""
        output["finish_reasons"][j] = choice.get("finish_reason")
        token_ids, prompt_ids = choice.get("token_ids"), choice.get("prompt_token_ids")
        stats = output["statistics"]
        stats["output_tokens"][j] = (
            len(token_ids) if token_ids is not None else usage.get("completion_tokens") if whole_request else None
        )
        if prompt_ids is not None:
            stats["input_tokens"][j] = len(prompt_ids)
        elif prompts == 1:
            stats["input_tokens"][j] = usage.get("prompt_tokens")
        if request.logprobs is not None:
            output.setdefault("logprobs", [[] for _ in range(n)])[j] = completion_logprobs(choice.get("logprobs"))
        if request.prompt_logprobs is not None and "prompt_logprobs" not in output and choice.get("prompt_logprobs"):
            output["prompt_logprobs"] = _prompt_logprobs(choice["prompt_logprobs"])
    for output in outputs:  # prompt_token_ids may be on the first choice of a prompt only
        inputs = output["statistics"]["input_tokens"]
        known = next((count for count in inputs if count is not None), None)
        output["statistics"]["input_tokens"] = [known if count is None else count for count in inputs]
    return outputs


def completion_alone(data: dict[str, Any], prompts: int, n: int) -> list[dict[str, Any]]:
    """The answer to a pack, cut into what the server would have answered each prompt sent alone: its ``n``
    choices indexed from 0, its own ``usage`` counted from the token ids (the client asks for them) and its own
    ``id``."""
    if prompts == 1:  # the server's own answer, usage exact
        return [data]
    per_prompt: list[list[dict[str, Any]]] = [[] for _ in range(prompts)]
    for choice in data["choices"]:
        position, j = divmod(choice["index"], n)
        per_prompt[position].append(dict(choice, index=j))
    answers = []
    for position, choices in enumerate(per_prompt):
        prompt_ids = next((choice["prompt_token_ids"] for choice in choices if choice.get("prompt_token_ids")), None)
        outputs: list[list[int] | None] = [choice.get("token_ids") for choice in choices]
        usage = None
        if prompt_ids is not None and all(ids is not None for ids in outputs):
            prompt_tokens = len(prompt_ids)
            completion_tokens = sum(len(ids or ()) for ids in outputs)
            usage = {**dict.fromkeys(data.get("usage") or {}), "prompt_tokens_details": None,  # the pack's details
                     "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,  # are not a prompt's
                     "total_tokens": prompt_tokens + completion_tokens}
        answer = dict(data, choices=choices, usage=usage)
        if isinstance(data.get("id"), str):  # vLLM's own id for this prompt of the request
            answer["id"] = f"{data['id']}-{position}"
        answers.append(answer)
    return answers


def chat_output(data: dict[str, Any], request: Request, request_id: str) -> GenerateOutput:
    n = request.n
    output = empty_output(n, request_id)
    usage = data.get("usage") or {}
    prompt_ids = data.get("prompt_token_ids")
    input_tokens = len(prompt_ids) if prompt_ids is not None else usage.get("prompt_tokens")
    for choice in data["choices"]:
        _chat_choice(output, choice["index"], choice, request, usage.get("completion_tokens") if n == 1 else None)
        output["statistics"]["input_tokens"][choice["index"]] = input_tokens
    if request.prompt_logprobs is not None and data.get("prompt_logprobs") is not None:
        output["prompt_logprobs"] = _prompt_logprobs(data["prompt_logprobs"])
    return output


def batch_chat_outputs(
    data: dict[str, Any], conversations: int, request: Request, request_id: str
) -> list[GenerateOutput]:
    """vLLM's ``/chat/completions/batch`` answer: choice ``i`` is conversation ``i`` (``n`` is 1).

    Its usage is summed over the pack and it carries no ``prompt_token_ids``: a conversation's input count
    is unknown (``None``); its output count comes from its choice's ``token_ids``.
    """
    outputs = [empty_output(1, request_id) for _ in range(conversations)]
    choices = data["choices"]
    if sorted(choice["index"] for choice in choices) != list(range(conversations)):
        raise ValueError(f"{len(choices)} choices for {conversations} conversations")
    for choice in choices:
        _chat_choice(outputs[choice["index"]], 0, choice, request, None)
    return outputs


def _chat_choice(output: GenerateOutput, j: int, choice: dict[str, Any], request: Request, tokens: int | None) -> None:
    """Generation ``j`` of ``output`` from a chat choice; ``tokens``: its output count if the choice has no ids."""
    message = choice.get("message") or {}
    output["generations"][j] = message.get("content") or ""
    output["finish_reasons"][j] = choice.get("finish_reason")
    token_ids = choice.get("token_ids")
    output["statistics"]["output_tokens"][j] = len(token_ids) if token_ids is not None else tokens
    n = len(output["generations"])
    tool_calls = message.get("tool_calls")
    if tool_calls:
        output.setdefault("tool_calls", [None] * n)[j] = tool_calls
    reasoning = message.get("reasoning") or message.get("reasoning_content")  # the older name
    if reasoning is not None:
        output.setdefault("reasoning", [None] * n)[j] = reasoning
    if request.logprobs is not None:
        output.setdefault("logprobs", [[] for _ in range(n)])[j] = chat_logprobs(choice.get("logprobs"))


def chat_logprobs(logprobs: dict[str, Any] | None) -> list[list[Logprob]]:
    """The chat API's ``{content: [{token, logprob, top_logprobs}]}`` → per-position top-k lists."""
    return [
        [{"token": top["token"], "logprob": top["logprob"]} for top in position.get("top_logprobs") or []]
        or [{"token": position["token"], "logprob": position["logprob"]}]
        for position in (logprobs or {}).get("content") or []
    ]


def completion_logprobs(logprobs: dict[str, Any] | None) -> list[list[Logprob]]:
    """vLLM's ``{tokens, token_logprobs, top_logprobs}`` → distilabel's per-position top-k lists."""
    if not logprobs:
        return []
    tokens = logprobs.get("tokens") or []
    chosen = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    result: list[list[Logprob]] = []
    for token, logprob, top in zip(tokens, chosen, tops, strict=False):
        if top:
            result.append([{"token": t, "logprob": lp} for t, lp in top.items()])
        else:
            result.append([{"token": token, "logprob": logprob}])
    return result


def _prompt_logprobs(positions: list[dict[str, Any] | None]) -> list[list[Logprob] | None]:
    """vLLM's ``[None, {token_id: {logprob, rank, decoded_token}}, ...]`` → per-position lists, in its order.

    The first position is ``None``: nothing precedes the first prompt token. Each later list starts with
    the prompt's own token (whatever its rank), then the top ``prompt_logprobs`` alternatives best first,
    each with its ``rank`` (1 = the model's best guess) — as for ``logprobs``, where the sampled token
    comes first.
    """
    return [
        None
        if position is None
        else [
            {"token": entry.get("decoded_token") or token_id, "logprob": entry["logprob"], "rank": entry["rank"]}
            for token_id, entry in position.items()
        ]
        for position in positions
    ]
