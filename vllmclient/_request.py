"""Checked parameters → the request body, built once per call (never per prompt).

Everything that can be known wrong before sending is refused here, for the whole call: a field the
server would silently ignore (the removed ``guided_*`` fields, a chat-only field on the completions
path), a value JSON cannot carry (NaN, infinity, a lone surrogate), a model that is not served.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ._server import ServerInfo
from .conversation import json_fault
from .errors import InvalidInputError, UnknownFieldWarning
from .params import GenerationParams, plain_int
from .structured import StructuredSpec, parse_spec

__all__ = ["Request", "build_request", "vllm_fields"]

# vLLM's sampling parameters, sent only when set (so the model's generation_config applies otherwise).
_VLLM_SAMPLING = (
    "top_k", "min_p", "repetition_penalty", "seed", "stop", "stop_token_ids", "include_stop_str_in_output",
    "min_tokens", "ignore_eos", "skip_special_tokens", "truncate_prompt_tokens", "truncation_side", "priority",
)

# The request fields vLLM reads (CompletionRequest / ChatCompletionRequest, vLLM 0.32-0.33). vLLM accepts any
# other key and ignores it with HTTP 200, so a typo would silently do nothing.
_COMMON_FIELDS = frozenset({
    "add_special_tokens", "allowed_token_ids", "bad_words", "cache_salt", "ec_transfer_params", "echo",
    "frequency_penalty", "ignore_eos", "include_stop_str_in_output", "kv_transfer_params", "length_penalty",
    "logit_bias", "logprob_token_ids", "logprobs", "max_tokens", "min_p", "min_tokens", "mm_payload", "model", "n",
    "presence_penalty", "priority", "prompt_logprobs", "repetition_detection", "repetition_penalty", "request_id",
    "response_format", "return_mm_kwargs", "return_token_ids", "return_token_offsets", "return_tokens_as_token_ids",
    "routed_experts_prompt_start", "seed", "session_id", "skip_special_tokens", "spaces_between_special_tokens",
    "stop", "stop_token_ids", "stream", "stream_interval", "stream_options", "structured_outputs", "temperature",
    "thinking_token_budget", "top_k", "top_p", "truncate_prompt_tokens", "truncation_side", "use_beam_search",
    "user", "vllm_xargs", "watermarking",
})
_COMPLETION_ONLY = frozenset({"prompt", "prompt_embeds", "suffix"})
_CHAT_ONLY = frozenset({
    "add_generation_prompt", "chat_template", "chat_template_kwargs", "continue_final_message", "documents",
    "include_reasoning", "max_completion_tokens", "media_io_kwargs", "messages", "mm_processor_kwargs",
    "parallel_tool_calls", "reasoning_effort", "return_prompt_text", "tool_choice", "tools", "top_logprobs",
})
# What vLLM's POST /v1/chat/completions/batch reads alike for every conversation (BatchChatCompletionRequest,
# vLLM 0.32; the last six are not declared there but reach each conversation's request all the same, checked on
# the server). Not here: n > 1, tools and tool_choice (refused, or ignored without a word), prompt_logprobs (its
# answer has none), stream, beam search, and any field not checked. A call using any of them sends one
# conversation per request.
_BATCH_CHAT_FIELDS = frozenset({
    "model", "n", "max_tokens", "max_completion_tokens", "frequency_penalty", "presence_penalty", "temperature",
    "top_p", "top_k", "min_p", "repetition_penalty", "length_penalty", "seed", "stop", "logit_bias", "logprobs",
    "top_logprobs", "logprob_token_ids", "return_token_ids", "return_tokens_as_token_ids", "response_format",
    "structured_outputs", "include_reasoning", "chat_template", "chat_template_kwargs", "add_generation_prompt",
    "continue_final_message", "media_io_kwargs", "mm_processor_kwargs", "priority", "cache_salt", "user", "echo",
    "include_stop_str_in_output",
    "min_tokens", "stop_token_ids", "ignore_eos", "skip_special_tokens", "truncate_prompt_tokens", "truncation_side",
})
# Removed in vLLM 0.12 (replaced by ``structured_outputs``); newer servers ignore them with HTTP 200.
_GUIDED = {
    "guided_json": "structured_outputs={'json': schema}",
    "guided_regex": "structured_outputs={'regex': pattern}",
    "guided_choice": "structured_outputs={'choice': [...]}",
    "guided_grammar": "structured_outputs={'grammar': ebnf}",
    "guided_decoding_backend": "the server's --structured-outputs-config (per request: no replacement)",
    "guided_whitespace_pattern": "nothing (vLLM reads no whitespace pattern; for compact JSON, start the server with "
    "--structured-outputs-config '{\"disable_any_whitespace\": true}')",
}
_CHAT_FIELDS = _COMMON_FIELDS | _CHAT_ONLY | _GUIDED.keys()  # all vLLM reads (see vllm_fields)
_COMPLETION_FIELDS = _COMMON_FIELDS | _COMPLETION_ONLY | _GUIDED.keys()
_GREEDY = 1e-5  # vLLM samples greedily below this temperature
_INT64_MIN = -(2**63)

# Set by the client from its own parameters, and needed to read the answer: extra_body may not change them.
_RESERVED = frozenset(
    {"model", "prompt", "messages", "n", "stream", "logprobs", "top_logprobs", "prompt_logprobs", "return_token_ids",
     "echo", "request_id", "max_tokens", "max_completion_tokens"}
)


@dataclass(frozen=True)
class Request:
    """Everything about a call except the prompts: the body template and how to read and check the answer."""

    body: dict[str, Any]
    n: int
    chat: bool
    logprobs: int | None
    prompt_logprobs: int | None
    max_model_len: int | None
    truncate_prompt_tokens: int | None
    chat_template_kwargs: Mapping[str, Any] | None = None
    structured: StructuredSpec | None = None
    structured_retries: int = 0
    keep_answer: bool = False
    """Put the server's answer for each input in its output (``answer``), for job files."""
    batch_fields: bool = False  # chat: every body field is one vLLM's /chat/completions/batch reads alike

    @property
    def packs_conversations(self) -> bool:
        """Whether conversations may share a request through ``/chat/completions/batch``: it refuses n > 1, and
        its answer cannot be cut into the one each conversation would have had alone (``keep_answer``)."""
        return self.batch_fields and self.n == 1 and not self.keep_answer

    def with_prompts(self, prompts: list[Any]) -> dict[str, Any]:
        body = dict(self.body)
        body["prompt"] = prompts
        return body

    def with_messages(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        body = dict(self.body)
        body["messages"] = list(messages)
        return body

    def with_conversations(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
        body = dict(self.body)
        body["messages"] = [list(messages) for messages in conversations]
        return body

    def again(self, n: int, attempt: int) -> Request:
        """The request that re-asks ``n`` generations per prompt, the ``attempt``-th time.

        vLLM seeds generation ``j`` of a request with ``seed + j``; a re-ask with the same seed would repeat
        the invalid text, so attempt ``a`` starts at ``seed + a * n_original``: new seeds, still deterministic.
        """
        body = {**self.body, "n": n}
        seed = body.get("seed")
        if seed is not None:
            body["seed"] = (seed + attempt * self.n - _INT64_MIN) % 2**64 + _INT64_MIN  # vLLM takes int64 seeds
        return replace(self, body=body, n=n)

    def prompt_budget(self, tokens: int) -> int:
        """How many prompt tokens the server keeps of ``tokens`` (after ``truncate_prompt_tokens``)."""
        keep = self.truncate_prompt_tokens
        if keep is None:
            return tokens
        if keep < 0:  # vLLM: as many as fit with room for one output token
            return min(tokens, (self.max_model_len or tokens + 1) - 1)
        return min(tokens, keep)


def build_request(
    params: GenerationParams, *, num_generations: int, chat: bool, server: ServerInfo, model: str
) -> Request:
    """The body every pack of this call shares; raises ``InvalidInputError`` for what cannot work."""
    num_generations = plain_int(num_generations)
    if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 1:
        raise InvalidInputError(f"num_generations={num_generations!r} is invalid: expected an int >= 1.")
    if num_generations > 1 and params.temperature < _GREEDY:
        raise InvalidInputError(
            f"num_generations={num_generations} with temperature={params.temperature:g} is invalid: temperature=0 "
            "is greedy, so every generation would be the same, and vLLM refuses n > 1 for it. Use "
            "num_generations=1, or a temperature > 0."
        )
    for name in ("stop", "logit_bias", "chat_template_kwargs", "tools", "tool_choice", "extra_body"):
        fault = json_fault(getattr(params, name))  # else every pack of the call would fail at the SDK
        if fault is not None:
            raise InvalidInputError(f"{name} cannot be sent as JSON: {fault}.")
    if params.model is not None:
        model = params.model
        if server.card(model) is None:
            raise InvalidInputError(
                f"model={model!r} is not served at {server.base_url}. Served: {', '.join(server.names)}."
            )
    max_model_len = server.max_model_len(model)
    if max_model_len is not None and params.max_new_tokens > max_model_len:
        raise InvalidInputError(
            f"max_new_tokens={params.max_new_tokens} is invalid: vLLM refuses more than the model's max_model_len "
            f"({max_model_len}) whatever the prompt. Ask for at most {max_model_len} (the server clamps it to the room "
            "the prompt leaves)."
        )
    if (
        params.truncate_prompt_tokens is not None
        and max_model_len is not None
        and params.truncate_prompt_tokens >= max_model_len
    ):
        raise InvalidInputError(
            f"truncate_prompt_tokens={params.truncate_prompt_tokens} is invalid: kept prompts of that many tokens "
            f"leave no room for output in the model's max_model_len ({max_model_len}), and vLLM refuses more. Use at "
            f"most {max_model_len - 1}, or -1 to keep as much as fits."
        )
    if not chat:
        for name in ("tools", "tool_choice"):
            if getattr(params, name) is not None:
                raise InvalidInputError(
                    f"{name}= needs the server's tool-call parser, which only the chat path runs: create the client "
                    "with tokenizer=None and serve the model with --enable-auto-tool-choice --tool-call-parser NAME."
                )

    body: dict[str, Any] = {
        "model": model,
        "n": num_generations,
        "max_tokens": params.max_new_tokens,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "temperature": params.temperature,
        "top_p": params.top_p,
        # Exact per-generation token counts: usage is summed over a whole (packed) request.
        "return_token_ids": True,
    }
    if params.logit_bias is not None:
        body["logit_bias"] = dict(params.logit_bias)
    for name in _VLLM_SAMPLING:
        value = getattr(params, name)
        if value is not None:
            body[name] = list(value) if isinstance(value, list) else value
    if params.logprobs is not None:
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = params.logprobs
        else:
            body["logprobs"] = params.logprobs
    if params.prompt_logprobs is not None:
        body["prompt_logprobs"] = params.prompt_logprobs
    if chat:
        for name in ("tools", "tool_choice", "chat_template_kwargs"):
            value = getattr(params, name)
            if value is not None:
                body[name] = value
    else:
        # The rendered template already starts with BOS; vLLM would add a second one by default.
        body["add_special_tokens"] = False
    if params.extra_body:
        body.update(_checked_extra_body(params.extra_body, chat=chat, server=server))
    structured = parse_spec(params.structured_outputs)
    if structured is not None:
        clash = sorted((set(_GUIDED) | {"structured_outputs", "response_format"}) & set(params.extra_body or ()))
        if clash:
            raise InvalidInputError(
                f"structured_outputs= and extra_body {', '.join(map(repr, clash))} both constrain the output; "
                "give only structured_outputs= (it is sent in the form this server reads, and checked)."
            )
        if params.structured_outputs_retries and params.temperature < _GREEDY:
            raise InvalidInputError(
                f"structured_outputs_retries={params.structured_outputs_retries} with temperature=0 would repeat "
                "the same invalid generation (greedy decoding ignores the seed): use temperature > 0, or no retries."
            )
        fields = structured.body_fields(guided=server.reads_guided_fields)
        fault = json_fault(fields)
        if fault is not None:
            raise InvalidInputError(f"structured_outputs cannot be sent as JSON: {fault}.")
        body.update(fields)
    return Request(
        body=body,
        n=num_generations,
        chat=chat,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        max_model_len=max_model_len,
        truncate_prompt_tokens=params.truncate_prompt_tokens,
        chat_template_kwargs=None if chat else params.chat_template_kwargs,
        structured=structured,
        structured_retries=params.structured_outputs_retries,
        batch_fields=chat and _BATCH_CHAT_FIELDS.issuperset(body),
    )


def _checked_extra_body(extra: Mapping[str, Any], *, chat: bool, server: ServerInfo) -> Mapping[str, Any]:
    clash = sorted(_RESERVED.intersection(extra))
    if clash:
        raise InvalidInputError(
            f"extra_body may not set {', '.join(clash)}: the client sets them from its own parameters "
            "(num_generations, max_new_tokens, logprobs, prompt_logprobs, model=, the inputs) and reads the answer "
            "accordingly."
        )
    if not chat and extra.get("add_special_tokens"):
        raise InvalidInputError(
            "extra_body add_special_tokens=True would give the model two BOS tokens: the client's chat template "
            "already starts the prompt with one. Leave it out (the client sends add_special_tokens=False)."
        )
    guided = [name for name in extra if name in _GUIDED]
    if guided and not server.reads_guided_fields:
        version = server.version_text or "unknown (no GET /version)"
        raise InvalidInputError(
            f"extra_body {', '.join(map(repr, guided))}: vLLM removed the guided_* fields in 0.12 and now ignores them "
            f"without a word (this server's version: {version}), so the output would not be constrained. Use "
            + "; ".join(f"{name} -> {_GUIDED[name]}" for name in guided)
            + " (or the typed structured_outputs= parameter)."
        )
    if not chat:
        wrong_path = sorted(name for name in extra if name in _CHAT_ONLY)
        if wrong_path:
            raise InvalidInputError(
                f"extra_body {', '.join(map(repr, wrong_path))} only applies to /v1/chat/completions, and this client "
                "renders prompts itself (/v1/completions), where the server ignores it. Use the typed parameter "
                "(chat_template_kwargs=, tools=) or create the client with tokenizer=None."
            )
    known = vllm_fields(chat=chat)
    unknown = sorted(name for name in extra if name not in known)
    if unknown:
        warnings.warn(
            f"vllmclient: extra_body key(s) {', '.join(map(repr, unknown))} are not vLLM request fields; vLLM ignores "
            "unknown fields without an error, so they will have no effect. Check the spelling.",
            UnknownFieldWarning,
            stacklevel=2,
        )
    return extra


def vllm_fields(*, chat: bool) -> frozenset[str]:
    """The request fields vLLM reads on ``/v1/chat/completions`` (``chat``) or ``/v1/completions``, the removed
    ``guided_*`` ones included (older servers read them); any other field it ignores without a word."""
    return _CHAT_FIELDS if chat else _COMPLETION_FIELDS
