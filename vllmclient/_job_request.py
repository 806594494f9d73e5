"""A job line's body (OpenAI / vLLM names) → the client's checked request, and its answer → the line's body.

Every body field is carried or refused: vLLM's typed sampling fields become ``GenerationParams`` (with
their checks), other vLLM fields go in ``extra_body`` (with its checks), and what the client cannot carry
(``stream``, ``echo``, ``request_id``, a field vLLM does not read) fails the line with a reason. Fields the
line leaves out are not sent, so the server's defaults apply as they would to the line sent alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ._engine import Prepare
from ._request import Request, build_request, vllm_fields
from .conversation import json_fault
from .errors import InvalidInputError, VLLMClientError
from .formatter import prepare_for
from .params import GenerationParams, parse_params

if TYPE_CHECKING:
    from .client import ClientvLLM

__all__ = ["Call", "plain_call", "prompt_kind"]

Finish = Callable[[dict[str, Any]], dict[str, Any]]

# Fields the client cannot carry for a line, and why.
_CANNOT = {
    "stream": "a job writes whole answers; leave stream out",
    "stream_options": "a job writes whole answers; leave stream_options out",
    "echo": "the answer would hold the prompt, which a packed request cannot give back per line; leave echo out",
    "request_id": "the client names each request itself (X-Request-Id, in the record's request_id); custom_id "
    "names the line",
    "prompt_embeds": "a job sends text or token-id prompts",
    "suffix": "vLLM does not support suffix",
}
# Chat fields only the server's own chat path applies: such lines go to /v1/chat/completions even with a tokenizer.
_SERVER_CHAT = frozenset(
    {"tools", "tool_choice", "chat_template", "add_generation_prompt", "continue_final_message", "documents",
     "include_reasoning", "media_io_kwargs", "mm_processor_kwargs", "parallel_tool_calls", "reasoning_effort",
     "return_prompt_text"}
)
_DEFAULTED = ("temperature", "top_p", "frequency_penalty", "presence_penalty")  # the client always sends these
_MAX_NEW_TOKENS = re.compile(r"\bmax_new_tokens\b")
# generate's words for what a line holds as body fields: its parameters, extra_body, typed structured_outputs=
_TERMS = [(re.compile(pattern), words) for pattern, words in [
    (r" \(or the typed structured_outputs= parameter\)", ""), (r"\bstructured_outputs=(?=\{)", "structured_outputs: "),
    (r"\bstructured_outputs=", "structured_outputs"), (r"\bextra_body (?=['a-z])", "the body field "),
    (r"\bnum_generations\b", "n"),
]]
_NOT_TYPED = frozenset({"max_new_tokens", "extra_body", "structured_outputs_retries"})  # not vLLM request fields


@dataclass(frozen=True)
class Call:
    """How the lines of one group are sent and answered; ``error``: why none of them can be."""

    request: Request | None
    prepare: Prepare | None
    finish: Finish
    error: VLLMClientError | None = None

    @classmethod
    def of(cls, client: ClientvLLM, url: str, body: Mapping[str, Any]) -> Call:
        try:
            return _batch_call(client, url, body)
        except InvalidInputError as exc:
            return cls(None, None, _same, InvalidInputError(_in_body_terms(str(exc), body)))
        except VLLMClientError as exc:
            return cls(None, None, _same, exc)


def _in_body_terms(message: str, body: Mapping[str, Any]) -> str:
    """An error about a line's body, named as the line wrote it rather than in ``generate``'s terms."""
    tokens = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    for pattern, words in [*_TERMS, (_MAX_NEW_TOKENS, tokens)]:
        message = pattern.sub(words, message)
    return message


def plain_call(client: ClientvLLM, params: Mapping[str, Any]) -> Call:
    """Plain lines: conversations with the call's parameters, as ``generate`` sends them; raises if they are bad."""
    request = replace(client._request(dict(params)), keep_answer=True)
    if request.structured_retries:
        raise InvalidInputError(
            "structured_outputs_retries is not supported in job files: a record holds the server's answer as it "
            "came. Leave it out (0); each answer is still constrained by structured_outputs."
        )
    chat = request.chat
    return Call(request, prepare_for(client._formatter, request),
                lambda answer: _strip_ids(answer if chat else as_chat(answer, request.logprobs), chat=True))


def prompt_kind(url: str | None, payload: Any) -> str:
    """Text and token-id prompts go in separate packs: vLLM takes a list of either, not a mix."""
    if url != "/v1/completions":
        return "messages"
    return "text" if isinstance(_single(payload), str) else "ids"


def _batch_call(client: ClientvLLM, url: str, body: Mapping[str, Any]) -> Call:
    chat = url == "/v1/chat/completions"
    server = client._server
    assert server is not None
    fields = dict(body)
    unknown = sorted(set(fields) - vllm_fields(chat=chat))
    if unknown:
        raise InvalidInputError(
            f"the body field(s) {', '.join(map(repr, unknown))} are not fields of vLLM's {url}; vLLM would ignore "
            "them without a word. Check the spelling, or remove them."
        )
    for name, why in _CANNOT.items():
        if fields.pop(name, None) not in (None, False):
            raise InvalidInputError(f"the body field {name!r} cannot be carried: {why}.")
    asked_ids = fields.pop("return_token_ids", None) is True
    n = fields.pop("n", None)
    max_tokens = fields.pop("max_tokens", None)
    if chat:
        newer = fields.pop("max_completion_tokens", None)
        if newer is not None and max_tokens is not None and newer != max_tokens:
            raise InvalidInputError(f"max_tokens={max_tokens} and max_completion_tokens={newer} disagree: give one.")
        max_tokens = newer if newer is not None else max_tokens
    model: str = fields["model"] if isinstance(fields.get("model"), str) else client.model_name
    params: dict[str, Any] = {"max_new_tokens": max_tokens if max_tokens is not None else
                              (server.max_model_len(model) or 128)}  # absent: not sent, the server's default applies
    if chat:
        logprobs, top = fields.pop("logprobs", None), fields.pop("top_logprobs", None)
        if logprobs not in (None, True, False):
            raise InvalidInputError(f"logprobs={logprobs!r} is invalid on {url}: true or false (top_logprobs: how many).")
        if logprobs:
            params["logprobs"] = 0 if top is None else top
        elif top not in (None, 0):
            raise InvalidInputError("top_logprobs needs logprobs: true, as vLLM requires.")
    add_special = None if chat else fields.pop("add_special_tokens", None)
    params.update({name: fields.pop(name) for name in list(fields)
                   if name in GenerationParams.model_fields and name not in _NOT_TYPED})
    if fields:
        params["extra_body"] = fields
    templated = chat and client._formatter is not None and not (set(body) & _SERVER_CHAT)
    request = build_request(parse_params(params), num_generations=1 if n is None else n,
                            chat=chat and not templated, server=server, model=client.model_name)
    sent = dict(request.body)
    for name in _DEFAULTED:
        if name not in body:
            sent.pop(name, None)
    if max_tokens is None:
        sent.pop("max_tokens", None)
    if not chat:  # the line's own prompt: the server adds BOS as it would for it alone, unless the line says
        sent.pop("add_special_tokens", None)
        if add_special is not None:
            sent["add_special_tokens"] = add_special
    request = replace(request, body=sent, keep_answer=True)
    if not chat:
        return Call(request, _completion_prompt, lambda answer: _strip_ids(answer, chat=False, asked=asked_ids))
    if templated:
        return Call(request, prepare_for(client._formatter, request),
                    lambda answer: _strip_ids(as_chat(answer, top or 0), chat=True, asked=asked_ids))
    return Call(request, prepare_for(None, request), lambda answer: _strip_ids(answer, chat=True, asked=asked_ids))


def _single(prompt: Any) -> Any:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return prompt[0]
    return prompt


def _completion_prompt(index: int, prompt: Any) -> Any:
    if prompt == "":  # vLLM refuses it alone, but answers it in a list: a pack would answer what alone fails
        raise InvalidInputError(f"input {index}: the prompt is empty, which vLLM refuses; give it some text or token "
                                "ids, or remove the line.")
    prompt = _single(prompt)
    if isinstance(prompt, str):
        fault = json_fault(prompt)
        if fault is not None:
            raise InvalidInputError(f"input {index}: the prompt cannot be sent as JSON: {fault}.")
        return prompt
    if (isinstance(prompt, list) and prompt
            and all(isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in prompt)):
        return prompt
    raise InvalidInputError(
        f"input {index}: prompt must be a string or a list of token ids (ints >= 0), got {str(prompt)[:80]}; one "
        "prompt per line (put several prompts on several lines)."
    )


def _same(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


def _strip_ids(answer: dict[str, Any], *, chat: bool, asked: bool = False) -> dict[str, Any]:
    """The client always asks for token ids (exact counts per line); a line that did not gets none, as alone."""
    if asked:
        return answer
    answer["choices"] = [dict(choice, token_ids=None) for choice in answer["choices"]]
    if chat:
        answer["prompt_token_ids"] = None
    else:
        for choice in answer["choices"]:
            choice["prompt_token_ids"] = None
    return answer


def as_chat(answer: dict[str, Any], top: int | None) -> dict[str, Any]:
    """A completion answered for a conversation the client rendered, in the chat answer's shape (every field kept);
    ``top``: the top logprobs asked for, which a chat answer holds (a completion's hold the sampled token too)."""
    body = {name: value for name, value in answer.items() if name != "choices"}
    body["object"] = "chat.completion"
    if isinstance(body.get("id"), str) and body["id"].startswith("cmpl-"):
        body["id"] = "chat" + body["id"]
    body["prompt_logprobs"] = body["prompt_token_ids"] = None
    choices = []
    for choice in answer["choices"]:
        rest = dict(choice)
        text, logprobs = rest.pop("text", None), rest.pop("logprobs", None)
        body["prompt_logprobs"] = body["prompt_logprobs"] or rest.pop("prompt_logprobs", None)
        body["prompt_token_ids"] = body["prompt_token_ids"] or rest.pop("prompt_token_ids", None)
        rest.pop("prompt_logprobs", None)
        rest.pop("prompt_token_ids", None)
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                   "function_call": None, "reasoning": None}  # vLLM leaves tool_calls out when there are none
        choices.append({"index": rest.pop("index"), "message": message, "logprobs": _chat_logprobs(logprobs, top), **rest})
    body["choices"] = choices
    body.setdefault("prompt_text", None)  # a chat answer's own fields, null as the server's chat path leaves them
    if isinstance(body.get("usage"), dict):
        body["usage"] = {**body["usage"], "completion_tokens_details": body["usage"].get("completion_tokens_details")}
    return body


def _chat_logprobs(logprobs: dict[str, Any] | None, top: int | None) -> dict[str, Any] | None:
    """Completions' ``{tokens, token_logprobs, top_logprobs}`` → chat's ``{content: [{token, logprob, bytes, top_logprobs}]}``."""
    if not logprobs:
        return None
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs.get("tokens") or [])
    content = []
    for token, logprob, step in zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [], tops,
                                    strict=False):
        content.append({
            "token": token, "logprob": logprob, "bytes": list(token.encode(errors="replace")),
            "top_logprobs": [{"token": alt, "logprob": value, "bytes": list(alt.encode(errors="replace"))}
                             for alt, value in list((step or {}).items())[:top]],
        })
    return {"content": content}
