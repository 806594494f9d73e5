"""Sampling parameters → request body, validated once per call (never per prompt)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError

# Only sent when set, so the server's (and the model's generation_config) defaults apply otherwise.
VLLM_PARAMETERS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
    "logprobs",
)


_RESERVED = frozenset(
    {"model", "prompt", "messages", "n", "stream", "logprobs", "top_logprobs", "return_token_ids", "echo"}
)


@dataclass(frozen=True)
class Request:
    """Everything about a call except the prompts: the body template and how to read the answer."""

    body: dict[str, Any]
    n: int
    logprobs: int | None
    chat: bool

    def with_prompts(self, prompts: list[str]) -> dict[str, Any]:
        body = dict(self.body)
        body["prompt"] = prompts
        return body

    def with_messages(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        body = dict(self.body)
        body["messages"] = list(messages)
        return body


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise InvalidInputError(f"{name}={value!r} is invalid: {rule}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_request(
    *,
    model: str,
    chat: bool,
    num_generations: int,
    max_new_tokens: int,
    frequency_penalty: float,
    logit_bias: Mapping[str, float] | None,
    presence_penalty: float,
    temperature: float,
    top_p: float,
    extra_body: Mapping[str, Any] | None,
    vllm: Mapping[str, Any],
) -> Request:
    """Validate what we can check locally (so a bad value fails fast, not once per prompt at the server)."""
    _check(_is_int(num_generations) and num_generations >= 1, "num_generations", num_generations, "an int >= 1")
    _check(_is_int(max_new_tokens) and max_new_tokens >= 1, "max_new_tokens", max_new_tokens, "an int >= 1")
    _check(_is_number(temperature) and temperature >= 0, "temperature", temperature, "a number >= 0")
    _check(_is_number(top_p) and 0 < top_p <= 1, "top_p", top_p, "a number in (0, 1]")
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        _check(_is_number(value) and -2 <= value <= 2, name, value, "a number in [-2, 2]")
    if logit_bias is not None:
        _check(isinstance(logit_bias, Mapping), "logit_bias", logit_bias, "a dict of token id (str) -> bias")
    top_k, min_p, rep = vllm.get("top_k"), vllm.get("min_p"), vllm.get("repetition_penalty")
    if top_k is not None:
        _check(_is_int(top_k) and top_k >= -1, "top_k", top_k, "an int >= -1 (0 or -1 disables it)")
    if min_p is not None:
        _check(_is_number(min_p) and 0 <= min_p <= 1, "min_p", min_p, "a number in [0, 1]")
    if rep is not None:
        _check(_is_number(rep) and rep > 0, "repetition_penalty", rep, "a number > 0")
    seed = vllm.get("seed")
    if seed is not None:
        _check(_is_int(seed), "seed", seed, "an int")
    stop = vllm.get("stop")
    if stop is not None:
        _check(
            isinstance(stop, str) or (isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop)),
            "stop", stop, "a str or a list of str",
        )
    stop_ids = vllm.get("stop_token_ids")
    if stop_ids is not None:
        _check(isinstance(stop_ids, Sequence) and all(_is_int(t) for t in stop_ids),
               "stop_token_ids", stop_ids, "a list of int token ids")
    min_tokens = vllm.get("min_tokens")
    if min_tokens is not None:
        _check(_is_int(min_tokens) and min_tokens >= 0, "min_tokens", min_tokens, "an int >= 0")
    logprobs = vllm.get("logprobs")
    if logprobs is not None:
        if logprobs is True:
            logprobs = 1
        _check(_is_int(logprobs) and logprobs >= 0, "logprobs", logprobs, "an int >= 0 (how many top tokens)")
    for flag in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
        if vllm.get(flag) is not None:
            _check(isinstance(vllm[flag], bool), flag, vllm[flag], "True or False")

    body: dict[str, Any] = {
        "model": model,
        "n": num_generations,
        "max_tokens": max_new_tokens,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "temperature": temperature,
        "top_p": top_p,
        # Exact per-generation token counts: usage is summed over a whole (packed) request.
        "return_token_ids": True,
    }
    if logit_bias is not None:
        body["logit_bias"] = dict(logit_bias)
    for name in VLLM_PARAMETERS:
        value = vllm.get(name)
        if value is None or name == "logprobs":
            continue
        body[name] = list(value) if name in ("stop", "stop_token_ids") and not isinstance(value, str) else value
    if logprobs is not None:
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = logprobs
        else:
            body["logprobs"] = logprobs
    if not chat:
        # The rendered template already starts with BOS; vLLM would add a second one by default.
        body["add_special_tokens"] = False
    if extra_body:
        clash = sorted(_RESERVED.intersection(extra_body))
        if clash:
            raise InvalidInputError(
                f"extra_body may not set {', '.join(clash)}: the client sets them from its own parameters "
                "(num_generations, logprobs, the inputs, the model) and reads the answer accordingly."
            )
        body.update(extra_body)
    return Request(body=body, n=num_generations, logprobs=logprobs, chat=chat)
