"""A fake vLLM OpenAI-compatible HTTP server for unit tests.

``FakeVLLM`` serves real HTTP on 127.0.0.1 from a background thread with its
own event loop (aiohttp), so sync tests, pytest-asyncio tests and a client's
own background loop can all talk to it. It mirrors vLLM 0.32/0.33 response
and error shapes (see shared/reference/vllm-api.md section C), counts tokens
exactly with the model's tokenizer, generates deterministic English text,
records every request and lets tests inject failures.

Faults (each applies to the next ``times`` requests to ``path``, "*" = any, whose
raw body contains ``match`` if given; several queue up in order of injection):
``fail_next`` answers an error status (any body, headers, content type: a 503
with ``Retry-After``, a proxy's HTML 502, a 200 HTML page), ``drop_next`` closes
the connection without answering, ``reset_next`` resets it (TCP RST) before any
byte or, with ``after_bytes``, after the headers and part of the body,
``truncate_next`` answers 200 with the JSON body cut short, ``delay_next`` answers
only after a delay. ``kill()`` resets every open connection and stops serving;
``start()`` serves again on the same port. ``Recorded.fault`` names the fault a
request got.

Generation: for prompt ``i`` and choice ``j`` a RNG seeded from (prompt,
``seed`` or a per-server request counter, ``j``) picks a target of 1 to
``2 * max_tokens`` words; text longer than ``min(max_tokens, max_model_len -
prompt_len)`` tokens is cut there (``finish_reason == "length"``), otherwise
it ends as if on EOS (``"stop"``, ``stop_reason`` null). A ``[[TAG]]`` in the
prompt (the last one; for chat, in the last message holding one) makes the
text begin with ``TAG``. ``completion_tokens`` of a choice is the exact token
count of its final text (special tokens excluded unless they are in the text).

Structured outputs: a request with ``structured_outputs`` (servers >= 0.12) or
the ``guided_*`` fields (servers < 0.12; each reads only its own form, so a
client sending the wrong one gets free text) is answered with text that meets
it: a choice picked by the RNG, a small instance of a JSON schema (``$ref``,
``anyOf``, ``enum`` ... followed), ``{"answer": word}`` for ``json_object``,
and for ``regex``/``grammar``/``structural_tag`` exactly the prompt's
``[[TAG]]`` (free text without one). It is cut at ``max_tokens`` like any text
(``finish_reason == "length"``). ``break_structured(marker, times)`` makes the
next ``times`` generations for prompts holding ``marker`` a few free words.
Two kinds at once is a 400, as in vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import ssl
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus
from pathlib import Path
from typing import Any, Self

from aiohttp import web

VERSION = "0.33.0"
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_COMPLETION_PROMPTS = 1024
DEFAULT_MAX_TOKENS = 16
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
_TAG_RE = re.compile(r"\[\[([^\[\]]+?)\]\]")
_RAW_BODY = web.RequestKey("fake_vllm_raw_body", bytes)
_REQUEST_ID = web.RequestKey("fake_vllm_request_id", str)

_WORDS = (
    "the", "cat", "dog", "sees", "a", "red", "ball", "in", "park", "my",
    "friend", "likes", "green", "tree", "near", "river", "happy", "child",
    "reads", "book", "at", "home", "today", "small", "bird", "finds", "house",
    "old", "farmer", "builds", "bridge", "every", "morning", "bright", "garden",
    "teacher", "opens", "window", "quiet", "train", "carries", "box", "warm",
    "cake", "slowly", "paints", "picture", "blue", "boat", "on", "hill",
    "night", "brings", "apple", "soft", "song", "again", "and", "then", "we",
)

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "Service Unavailable",
}
_DEFAULT_MESSAGES = {
    500: "The server had an error while processing your request.",
    503: (
        "The engine is currently busy and cannot accept new requests. "
        "Please retry later."
    ),
}


# --------------------------------------------------------------------------- records


@dataclass
class Recorded:
    """One HTTP request as the fake received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any | None
    fault: str | None = None  # the injected fault this request got ("503", "reset", "delay", ...)
    at: float = 0.0  # time.monotonic() when it arrived
    texts: list[str] | None = None  # /v1/completions: each prompt as text (token ids decoded, as the model reads them)

    @property
    def retry_count(self) -> int:
        """The openai SDK's ``x-stainless-retry-count``: 0 for a first attempt."""
        return int(self.headers.get("x-stainless-retry-count", "0"))


@dataclass
class _Fault:
    """One injected fault; ``kind`` is "status", "drop", "reset", "truncate" or "delay"."""

    kind: str
    remaining: int
    match: bytes | None = None
    status: int = 200
    body: Any = None
    headers: dict[str, str] | None = None
    content_type: str | None = None
    cut: int | None = None  # "reset": body bytes sent before the reset; "truncate": body bytes kept
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return str(self.status) if self.kind == "status" else self.kind


class _ApiError(Exception):
    """An error answered as a vLLM ``ErrorResponse`` (or a raw body)."""

    def __init__(
        self,
        status: int,
        message: str = "",
        *,
        type_: str | None = None,
        param: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else error_body(status, message, type_=type_, param=param)
        self.headers = headers


def error_body(status: int, message: str | None = None, *, type_: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """A vLLM-style ``{"error": {message, type, param, code}}`` body."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    if message is None:
        message = _DEFAULT_MESSAGES.get(status, phrase)
    return {"error": {"message": message, "type": type_ or _ERROR_TYPES.get(status, phrase),
                      "param": param, "code": status}}


def _validation_error(errors: list[Any]) -> _ApiError:
    """FastAPI/pydantic request-validation error as vLLM answers it (type "Bad Request")."""
    n = len(errors)
    lines = "\n".join(f"  {e}" for e in errors)
    message = f"{n} validation error{'s' if n != 1 else ''}:\n{lines}"
    param = errors[0].get("loc") if errors and isinstance(errors[0], dict) else None
    return _ApiError(400, message, type_="Bad Request", param=param)


def _vllm_validation(message: str, parameter: str | None = None, value: Any = None) -> _ApiError:
    """``VLLMValidationError`` → 400 BadRequestError with the 0.32+ suffix."""
    extras = []
    if parameter is not None:
        extras.append(f"parameter={parameter}")
    if value is not None:
        extras.append(f"value={value}")
    if extras:
        message = f"{message} ({', '.join(extras)})"
    return _ApiError(400, message, type_="BadRequestError", param=parameter)


# --------------------------------------------------------------------------- tokenizer


class _Tok:
    """Fast tokenizer for counts/encoding; HF tokenizer (lazy) for chat templates."""

    def __init__(self, tokenizer_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.dir = tokenizer_dir
        self.fast = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        config: dict[str, Any] = {}
        cfg_path = tokenizer_dir / "tokenizer_config.json"
        if cfg_path.exists():
            config = json.loads(cfg_path.read_text())

        def special(name: str, default: str) -> str:
            value = config.get(name) or default
            return value["content"] if isinstance(value, dict) else str(value)

        self.bos_text = special("bos_token", "<|begin_of_text|>")
        self.eos_text = special("eos_token", "<|eot_id|>")
        self.eos_id = self.fast.token_to_id(self.eos_text)
        self.vocab_size = self.fast.get_vocab_size(with_added_tokens=True)
        self.base_vocab_size = self.fast.get_vocab_size(with_added_tokens=False)
        # vLLM's bound for its character check before tokenizing: the longest token's length in characters.
        self.max_chars_per_token = max(len(self.fast.decode([i], skip_special_tokens=False))
                                       for i in range(self.vocab_size))
        self._hf: Any = None
        self._hf_lock = threading.Lock()
        self.encode = lru_cache(maxsize=65536)(self._encode)
        self.token_str = lru_cache(maxsize=8192)(self._token_str)

    def _encode(self, text: str, add_special_tokens: bool) -> tuple[int, ...]:
        return tuple(self.fast.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_text(self, text: str) -> list[int]:
        """Encode generated text (no special tokens added, uncached)."""
        return self.fast.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | tuple[int, ...], skip_special_tokens: bool = True) -> str:
        return self.fast.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _token_str(self, token_id: int) -> str:
        return self.fast.decode([token_id], skip_special_tokens=False)

    def hf(self) -> Any:
        with self._hf_lock:
            if self._hf is None:
                from transformers import AutoTokenizer

                self._hf = AutoTokenizer.from_pretrained(str(self.dir))
            return self._hf

    def render_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.hf().apply_chat_template(messages, tokenize=False, **kwargs)


_TOKS: dict[str, _Tok] = {}
_TOKS_LOCK = threading.Lock()


def _get_tok(tokenizer_dir: str | Path) -> _Tok:
    path = Path(tokenizer_dir).resolve()
    key = f"{path}:{(path / 'tokenizer.json').stat().st_mtime_ns}"
    with _TOKS_LOCK:
        tok = _TOKS.get(key)
        if tok is None:
            tok = _TOKS[key] = _Tok(path)
        return tok


# --------------------------------------------------------------------------- request validation

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _coerce(kind: str, value: Any) -> tuple[Any, tuple[str, str] | None]:
    """Pydantic-v2-lax coercion; returns (value, (error type, msg) | None)."""
    if kind == "int":
        if isinstance(value, bool):
            return int(value), None
        if isinstance(value, int):
            return value, None
        if isinstance(value, float):
            if value.is_integer():
                return int(value), None
            return value, ("int_from_float",
                           "Input should be a valid integer, got a number with a fractional part")
        if isinstance(value, str):
            try:
                return int(value.strip()), None
            except ValueError:
                return value, ("int_parsing",
                               "Input should be a valid integer, unable to parse string as an integer")
        return value, ("int_type", "Input should be a valid integer")
    if kind == "float":
        if isinstance(value, (bool, int, float)):
            return float(value), None
        if isinstance(value, str):
            try:
                return float(value.strip()), None
            except ValueError:
                return value, ("float_parsing",
                               "Input should be a valid number, unable to parse string as a number")
        return value, ("float_type", "Input should be a valid number")
    if kind == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, int) and value in (0, 1):
            return bool(value), None
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE, None
        if isinstance(value, (int, str)):
            return value, ("bool_parsing", "Input should be a valid boolean, unable to interpret input")
        return value, ("bool_type", "Input should be a valid boolean")
    if kind == "str":
        if isinstance(value, str):
            return value, None
        return value, ("string_type", "Input should be a valid string")
    raise AssertionError(kind)


_COMMON_FIELDS: dict[str, str] = {
    "model": "str", "n": "int", "seed": "int", "min_tokens": "int", "top_k": "int",
    "prompt_logprobs": "int", "truncate_prompt_tokens": "int", "priority": "int",
    "temperature": "float", "top_p": "float", "frequency_penalty": "float",
    "presence_penalty": "float", "min_p": "float", "repetition_penalty": "float",
    "length_penalty": "float", "stream": "bool", "include_stop_str_in_output": "bool",
    "ignore_eos": "bool", "skip_special_tokens": "bool", "spaces_between_special_tokens": "bool",
    "add_special_tokens": "bool", "return_token_ids": "bool", "use_beam_search": "bool",
    "echo": "bool", "return_tokens_as_token_ids": "bool", "request_id": "str",
}
_COMPLETION_FIELDS = {**_COMMON_FIELDS, "max_tokens": "int", "logprobs": "int"}
_CHAT_FIELDS = {
    **_COMMON_FIELDS, "max_tokens": "int", "max_completion_tokens": "int", "logprobs": "bool",
    "top_logprobs": "int", "add_generation_prompt": "bool", "continue_final_message": "bool",
}
_NOT_NULL = {"min_tokens", "ignore_eos", "include_stop_str_in_output", "add_special_tokens",
             "use_beam_search", "length_penalty", "add_generation_prompt",
             "continue_final_message", "priority", "request_id"}


def _validate_fields(body: dict[str, Any], fields: dict[str, str]) -> None:
    """Coerce known fields in place; raise a pydantic-style 400 on bad types."""
    errors: list[dict[str, Any]] = []
    for name, kind in fields.items():
        if name not in body:
            continue
        value = body[name]
        if value is None:
            if name in _NOT_NULL:
                errors.append({"type": f"{kind}_type" if kind != "str" else "string_type",
                               "loc": f"body.{name}", "msg": _coerce(kind, object())[1][1],  # type: ignore[index]
                               "input": None})
            continue
        coerced, err = _coerce(kind, value)
        if err is not None:
            errors.append({"type": err[0], "loc": f"body.{name}", "msg": err[1], "input": value})
        else:
            body[name] = coerced
    seed = body.get("seed")
    if isinstance(seed, int) and not _INT64_MIN <= seed <= _INT64_MAX:
        bound = ("greater_than_equal", f"greater than or equal to {_INT64_MIN}") if seed < 0 else (
            "less_than_equal", f"less than or equal to {_INT64_MAX}")
        errors.append({"type": bound[0], "loc": "body.seed", "msg": f"Input should be {bound[1]}",
                       "input": seed})
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            errors.append({"type": "string_type", "loc": "body.stop", "msg": "Input should be a valid string",
                           "input": stop})
        elif len(stop) > MAX_STOP_STRINGS:
            errors.append({"type": "too_long", "loc": "body.stop",
                           "msg": f"List should have at most {MAX_STOP_STRINGS} items after validation, "
                                  f"not {len(stop)}",
                           "input": stop, "ctx": {"field_type": "List", "max_length": MAX_STOP_STRINGS,
                                                  "actual_length": len(stop)}})
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list)
                                 or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
        errors.append({"type": "list_type", "loc": "body.stop_token_ids", "msg": "Input should be a valid list",
                       "input": stop_ids})
    if body.get("stream_options") is not None and not body.get("stream"):
        errors.append({"type": "value_error", "loc": "body",
                       "msg": "Value error, Stream options can only be defined when `stream=True`.",
                       "input": body})
    if errors:
        raise _validation_error(errors)


# --------------------------------------------------------------------------- generation


@dataclass
class _Choice:
    text: str
    ids: list[int]
    finish_reason: str
    stop_reason: int | str | None
    logprob_seed: str


@dataclass
class _Turn:
    """One conversation of a chat request, rendered and checked."""

    prompt: str
    prompt_ids: tuple[int, ...]
    params: _Params
    k: int  # top logprobs
    texts: list[str]
    tag: str | None


@dataclass
class _Params:
    max_tokens: int  # effective limit for this prompt
    target_cap: int  # upper bound of the random word count
    stop: list[str]
    stop_token_ids: list[int]
    include_stop: bool
    skip_special: bool
    ignore_eos: bool
    min_tokens: int
    seed_part: str
    constraint: tuple[str, Any] | None = None


def _find_tag(text: str) -> str | None:
    tags = _TAG_RE.findall(text)
    return tags[-1] if tags else None


def _words(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        word = rng.choice(_WORDS)
        if rng.random() < 0.12:
            word += "."
        out.append(word)
    return out


def _join(words: list[str], tag: str | None, chat: bool) -> str:
    if tag is not None:
        return " ".join([tag, *words])
    text = " ".join(words)
    if chat:
        return text[:1].upper() + text[1:]
    return " " + text


def _generate(tok: _Tok, key: str, j: int, tag: str | None, chat: bool, p: _Params,
              free: bool = False) -> _Choice:
    seed_str = f"{key}\x1f{p.seed_part}\x1f{j}"
    rng = random.Random(seed_str)
    limit = p.max_tokens
    forced = None if p.constraint is None or free else _constrained(*p.constraint, rng, tag)
    # Every word is at least one token, so more than limit + 1 words never matter.
    count = rng.randint(1, max(1, p.target_cap))
    words = _words(rng, min(count if not free else 1 + count % 5, limit + 1))  # broken output: a few words
    text = _join(words, tag, chat) if forced is None else forced
    ids = tok.encode_text(text)
    want = limit if p.ignore_eos else min(p.min_tokens, limit)
    while forced is None and len(ids) < want:  # ignore_eos / min_tokens: keep generating
        words += _words(rng, max(4, want - len(ids)))
        text = _join(words, tag, chat)
        ids = tok.encode_text(text)

    finish, stop_reason = "stop", None
    if len(ids) > limit:
        finish = "length"
        cut = limit
        while cut > 0:  # keep text and ids consistent (re-encoding round-trips)
            text = tok.decode(ids[:cut])
            if tok.encode_text(text) == ids[:cut]:
                break
            cut -= 1
        ids = ids[:cut]
        text = tok.decode(ids)

    if p.stop_token_ids:
        stop_set = set(p.stop_token_ids)
        for pos, tid in enumerate(ids):
            if tid in stop_set:
                ids = ids[: pos + 1]  # a non-special stop token stays in the text
                text = tok.decode(ids)
                finish, stop_reason = "stop", tid
                break

    changed = False
    if p.stop:
        best: tuple[int, str] | None = None
        for s in p.stop:
            pos = text.find(s)
            if pos >= 0 and (best is None or pos + len(s) < best[0] + len(best[1])):
                best = (pos, s)
        if best is not None:
            pos, s = best
            text = text[: pos + len(s)] if p.include_stop else text[:pos]
            finish, stop_reason, changed = "stop", s, True

    if finish == "stop" and stop_reason is None and p.include_stop and not p.skip_special:
        text += tok.eos_text  # EOS shows only with both flags, as in vLLM
        changed = True

    if changed:
        ids = tok.encode_text(text) if text else []
    return _Choice(text, list(ids), finish, stop_reason, seed_str)


_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_GUIDED_KINDS = ("json", "regex", "choice", "grammar")


def _read_constraint(body: dict[str, Any], guided: bool) -> tuple[str, Any] | None:
    """The structured-outputs constraint this server reads (vLLM < 0.12: guided_*; later: structured_outputs)."""
    if guided:
        found = {kind: body.get(f"guided_{kind}") for kind in _GUIDED_KINDS}
    else:
        spec = body.get("structured_outputs")
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise _validation_error([{"type": "dict_type", "loc": "body.structured_outputs",
                                      "msg": "Input should be a valid dictionary", "input": spec}])
        found = {kind: spec.get(kind) for kind in _KINDS}
    given = [(kind, value) for kind, value in found.items() if value is not None]
    if len(given) > 1 or (not given and not guided):
        which = "multiple are specified" if given else "none are specified"
        raise _vllm_validation(f"You {'can only' if given else 'must'} use one kind of structured outputs "
                               f"constraint but {which}: {found}")
    return given[0] if given else None


def _constrained(kind: str, value: Any, rng: random.Random, tag: str | None) -> str | None:
    """Text meeting the constraint, or None when the fake cannot make one (then: free text)."""
    if kind == "choice":
        return str(rng.choice(value))
    if kind == "json":
        schema = json.loads(value) if isinstance(value, str) else value
        return json.dumps(_instance(schema, schema, rng))
    if kind == "json_object":
        return json.dumps({"answer": rng.choice(_WORDS)})
    return tag  # regex, grammar, structural_tag: the prompt dictates the text


def _instance(schema: Any, root: dict[str, Any], rng: random.Random) -> Any:
    """A small value valid for the JSON schema (the subset pydantic and tests use)."""
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return _instance(target, root, rng)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return _instance(schema[key][0], root, rng)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: _instance(sub, root, rng) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [_instance(schema.get("items", {}), root, rng) for _ in range(max(1, schema.get("minItems", 1)))]
    if kind == "integer":
        return rng.randint(schema.get("minimum", 0), schema.get("maximum", 99))
    if kind == "number":
        return round(rng.uniform(schema.get("minimum", 0), schema.get("maximum", 99)), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return rng.choice(_WORDS)


def _completion_logprobs(tok: _Tok, ids: list[int], k: int, seed: str, offset: int = 0) -> dict[str, Any]:
    rng = random.Random("logprobs\x1f" + seed)
    text_offset, token_logprobs, tokens, top = [], [], [], []
    pos = offset
    for tid in ids:
        s = tok.token_str(tid)
        lp = round(-rng.random() * 3.0, 4)
        entry = {s: lp}
        for rank in range(k):
            alt = tok.token_str(rng.randrange(tok.base_vocab_size))
            entry.setdefault(alt, round(lp - 0.5 - rank - rng.random(), 4))
        text_offset.append(pos)
        token_logprobs.append(lp)
        tokens.append(s)
        top.append(entry)
        pos += len(s)
    return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top}


def _chat_logprobs(tok: _Tok, ids: list[int], k: int, seed: str) -> dict[str, Any]:
    rng = random.Random("logprobs\x1f" + seed)
    content = []
    for tid in ids:
        s = tok.token_str(tid)
        lp = round(-rng.random() * 3.0, 4)
        tops = [{"token": s, "logprob": lp, "bytes": list(s.encode())}]
        for rank in range(1, k):
            alt = tok.token_str(rng.randrange(tok.base_vocab_size))
            alp = round(lp - 0.5 - rank - rng.random(), 4)
            tops.append({"token": alt, "logprob": alp, "bytes": list(alt.encode())})
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": tops[:k]})
    return {"content": content}


# --------------------------------------------------------------------------- server


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeVLLM:
    """Fake vLLM 0.33 OpenAI-compatible server on 127.0.0.1 (background thread)."""

    def __init__(
        self,
        tokenizer_dir: str | Path,
        *,
        models: list[dict] | None = None,
        api_key: str | None = None,
        latency: float = 0.0,
        request_id_headers: bool = False,
        port: int = 0,
        version: str = VERSION,
        reasoning_parser: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        batch_chat: bool = True,
    ) -> None:
        self.tokenizer_dir = Path(tokenizer_dir)
        self._tok = _get_tok(self.tokenizer_dir)
        self.models: list[dict] = [dict(m) for m in (models or [{"id": "tiny-llama", "max_model_len": 1024}])]
        if not any(m.get("parent") is None for m in self.models):
            raise ValueError("models needs at least one base model (a card without 'parent')")
        self.api_key = api_key
        self.latency = latency
        self.request_id_headers = request_id_headers
        self.version = version  # GET /version; "" answers 404 (a server without the route)
        self.reasoning_parser = reasoning_parser  # as `vllm serve --reasoning-parser ...`: thinking split off
        self.batch_chat = batch_chat  # False: no POST /v1/chat/completions/batch (404, as vLLM before it)
        self.requests: list[Recorded] = []
        self.completion_requests = 0
        self.answered_prompts: list[str] = []  # the prompts (chat: the messages) of the answered requests, in order
        self.streams_aborted = 0  # streamed answers whose client went away before the end
        self.max_in_flight_requests = 0
        self.max_in_flight_sequences = 0
        self.in_flight_requests = 0
        self.in_flight_sequences = 0
        self.base_url = ""
        self.port = port
        self.ssl_context = ssl_context  # serve HTTPS with it (base_url is then https://)
        self._created = int(time.time())
        self._fingerprint = f"vllm-{VERSION}-{uuid.uuid4().hex[:8]}"
        self._counter = 0
        self._lock = threading.Lock()
        self._faults: dict[str, deque[_Fault]] = {}
        self._prompt_failures: dict[str, tuple[int, str | None]] = {}
        self._breaks: dict[str, int] = {}
        self._aborts: set[str] = set()
        self._slow_prompts: dict[str, float] = {}
        self._stream_delay = 0.0
        self._stream_errors: deque[tuple[int, dict[str, Any]]] = deque()
        self._stream_cuts: deque[int] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Start serving; returns self once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FakeVLLM already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self.base_url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._setup(sock))
            except (OSError, RuntimeError) as e:  # pragma: no cover - startup failure
                error.append(e)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name=f"FakeVLLM:{self.port}", daemon=True)
        self._thread.start()
        ready.wait(30)
        if error:
            raise error[0]
        return self

    async def _setup(self, sock: socket.socket) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ping", self._health)
        app.router.add_post("/ping", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/load", self._load)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        if self.batch_chat:
            app.router.add_post("/v1/chat/completions/batch", self._chat_batch)
        # uvicorn's keep-alive in vLLM is 5 s; handlers are cancelled on client disconnect.
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=5.0,
                                     handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, backlog=2048, ssl_context=self.ssl_context).start()

    def stop(self) -> None:
        """Stop serving and join the thread (in-flight requests get up to 1 s to finish)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None and loop.is_running():
            with contextlib.suppress(TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=10)
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = self._runner = None

    def kill(self) -> None:
        """Die like a crashed process: stop listening, reset every open connection, stop.

        ``start()`` afterwards serves again on the same port (recorded requests are kept).
        """
        loop, runner = self._loop, self._runner
        if loop is not None and runner is not None and loop.is_running():

            async def crash() -> None:
                for site in list(runner.sites):
                    await site.stop()  # closes the listening socket: new connections are refused
                server = runner.server
                for handler in server.connections if server is not None else ():
                    if handler.transport is not None:
                        _reset(handler.transport)

            with contextlib.suppress(TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(crash(), loop).result(timeout=10)
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- test controls

    def clear(self) -> None:
        """Forget recorded requests; reset counters and high-water marks."""
        with self._lock:
            self.requests.clear()
            self.completion_requests = 0
            self.answered_prompts.clear()
            self.streams_aborted = 0
            self.max_in_flight_requests = self.in_flight_requests
            self.max_in_flight_sequences = self.in_flight_sequences

    def fail_next(self, status: int, *, body: Any = None, path: str = "/v1/completions", times: int = 1,
                  headers: dict | None = None, content_type: str | None = None, match: str | None = None) -> None:
        """Answer the next ``times`` requests to ``path`` ("*" = any) with ``status``/``body``.

        Default body: vLLM's error object for ``status`` (401: ``{"error": "Unauthorized"}``).
        A str/bytes body is sent raw (``content_type``, default text/plain); anything else as JSON.
        ``headers`` are added (e.g. ``{"Retry-After": "0.01"}``); ``match`` limits the fault to
        requests whose raw body contains it (e.g. one input's text).
        """
        if body is None:
            body = {"error": "Unauthorized"} if status == 401 else error_body(status)
        self._add_fault(path, _Fault("status", times, status=status, body=body, headers=headers,
                                     content_type=content_type), match)

    def fail_prompts_containing(self, marker: str, *, status: int = 400, message: str | None = None) -> None:
        """Fail any completions/chat request whose prompt (or message) contains ``marker``.

        The whole request fails (one error per HTTP request, as vLLM). Default
        message: vLLM's context-length error (param ``input_tokens``).
        """
        with self._lock:
            self._prompt_failures[marker] = (status, message)

    def abort_prompts_containing(self, marker: str) -> None:
        """End the generations of any prompt (or message) holding ``marker`` early with finish_reason
        ``"abort"`` and HTTP 200, as vLLM answers the requests in flight when it shuts down (SIGTERM)."""
        with self._lock:
            self._aborts.add(marker)

    def _maybe_aborted(self, text: str, choice: _Choice) -> _Choice:
        with self._lock:
            if not any(marker in text for marker in self._aborts):
                return choice
        ids = choice.ids[: max(1, len(choice.ids) // 2)]
        return _Choice(self._tok.decode(ids), ids, "abort", None, choice.logprob_seed)

    def break_structured(self, marker: str, *, times: int = 1) -> None:
        """Answer the next ``times`` constrained generations for prompts holding ``marker`` with free text."""
        with self._lock:
            self._breaks[marker] = self._breaks.get(marker, 0) + times

    def _take_break(self, text: str) -> bool:
        with self._lock:
            for marker, left in self._breaks.items():
                if left > 0 and marker in text:
                    self._breaks[marker] = left - 1
                    return True
        return False

    def _constraint(self, body: dict[str, Any]) -> tuple[str, Any] | None:
        match = re.match(r"(\d+)\.(\d+)", self.version or "")
        guided = match is not None and (int(match.group(1)), int(match.group(2))) < (0, 12)
        return _read_constraint(body, guided)

    def slow_prompts_containing(self, marker: str, seconds: float) -> None:
        """Answer any completions/chat request whose prompt (or message) contains ``marker`` after
        ``seconds`` (instead of ``latency``): one generation much longer than the others."""
        with self._lock:
            self._slow_prompts[marker] = seconds

    def slow_streams(self, seconds_per_chunk: float) -> None:
        """Stream answers (``stream: true``) one chunk every ``seconds_per_chunk``, as a model generating slowly."""
        with self._lock:
            self._stream_delay = seconds_per_chunk

    def fail_next_stream(self, *, after_chunks: int = 1, status: int = 500, message: str = "Internal server error",
                         type_: str = "InternalServerError") -> None:
        """The next streamed answer sends ``after_chunks`` chunks, then vLLM's mid-stream error event
        (``data: {"error": {...}}``, as its GenerationError handler sends), then ``data: [DONE]``."""
        with self._lock:
            self._stream_errors.append((after_chunks, error_body(status, message, type_=type_)))

    def cut_next_stream(self, *, after_chunks: int = 1) -> None:
        """The next streamed answer sends ``after_chunks`` chunks, then ends its HTTP answer cleanly: no finish
        reason, no ``[DONE]`` (as a proxy that closes a long answer does)."""
        with self._lock:
            self._stream_cuts.append(after_chunks)

    def drop_next(self, *, path: str = "/v1/completions", times: int = 1, match: str | None = None) -> None:
        """Close the connection without answering the next ``times`` requests to ``path``."""
        self._add_fault(path, _Fault("drop", times), match)

    def reset_next(self, *, path: str = "/v1/completions", times: int = 1, after_bytes: int | None = None,
                   match: str | None = None) -> None:
        """Reset the connection (TCP RST) of the next ``times`` requests to ``path``.

        By default before any byte of the answer; with ``after_bytes``, after the status line, the
        headers (announcing the whole body's length) and that many bytes of the real answer's body.
        """
        self._add_fault(path, _Fault("reset", times, cut=after_bytes), match)

    def truncate_next(self, *, path: str = "/v1/completions", times: int = 1, keep: int | None = None,
                      match: str | None = None) -> None:
        """Answer 200 with the real JSON body cut to ``keep`` bytes (default: half), a complete HTTP answer."""
        self._add_fault(path, _Fault("truncate", times, cut=keep), match)

    def delay_next(self, seconds: float, *, path: str = "/v1/completions", times: int = 1,
                   match: str | None = None) -> None:
        """Start answering the next ``times`` requests to ``path`` only after ``seconds``.

        If the client gives up first, the request is abandoned like any other (not counted as answered).
        """
        self._add_fault(path, _Fault("delay", times, seconds=seconds), match)

    def clear_failures(self) -> None:
        """Remove all pending injected failures."""
        with self._lock:
            self._faults.clear()
            self._prompt_failures.clear()
            self._breaks.clear()
            self._aborts.clear()
            self._slow_prompts.clear()
            self._stream_errors.clear()
            self._stream_cuts.clear()
            self._stream_delay = 0.0

    def settle(self, deadline: float = 2.0) -> None:
        """Wait until no request is in flight and none has arrived for a moment (at most ``deadline`` s): a
        call that ended early (an error, a refusal) may have requests on their way that land only after it
        returned, which the next ``clear()`` would otherwise not forget."""
        end = time.monotonic() + deadline
        seen = -1
        while (seen != len(self.requests) or self.in_flight_requests) and time.monotonic() < end:
            seen = len(self.requests)
            time.sleep(0.05)

    def requests_to(self, path: str) -> list[Recorded]:
        """Recorded requests whose path is ``path``."""
        return [r for r in list(self.requests) if r.path == path]

    # ----------------------------------------------------------------- middleware

    def _add_fault(self, path: str, fault: _Fault, match: str | None) -> None:
        if fault.remaining < 1:
            raise ValueError(f"times must be at least 1, got {fault.remaining}")
        fault.match = match.encode() if match is not None else None
        with self._lock:
            self._faults.setdefault(path, deque()).append(fault)

    def _prompt_texts(self, body: Any) -> list[str] | None:
        """The prompts of a completions body as text: token-id prompts decoded (ids out of range left out)."""
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if isinstance(prompt, str):
            return [prompt]
        if not isinstance(prompt, list) or not prompt:
            return None
        items = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
        if not all(isinstance(item, (str, list)) for item in items):
            return None
        return [item if isinstance(item, str) else self._tok.decode(
                    [t for t in item if isinstance(t, int) and 0 <= t < self._tok.vocab_size], skip_special_tokens=False)
                for item in items]

    def _take_fault(self, path: str, raw: bytes, texts: list[str] | None = None) -> _Fault | None:
        """The first pending fault for ``path`` (then "*") that matches this request (its raw body, or a
        prompt's text: token-id prompts match by what they decode to); uses one of its times."""
        with self._lock:
            for key in (path, "*"):
                queue = self._faults.get(key, ())
                for fault in queue:
                    if (fault.match is None or fault.match in raw
                            or any(fault.match in text.encode() for text in texts or ())):
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            queue.remove(fault)  # type: ignore[union-attr]
                        return fault
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = Recorded(request.method, request.path, headers, body, at=time.monotonic(),
                          texts=self._prompt_texts(body) if request.path == "/v1/completions" else None)
        with self._lock:
            self.requests.append(record)
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        request[_REQUEST_ID] = request.headers.get("X-Request-Id", "")
        try:
            response = await self._dispatch(request, handler, raw, record)
        except _ApiError as e:
            response = _json_response(e.body, e.status, e.headers)
        if self.request_id_headers and not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response

    async def _dispatch(self, request: web.Request, handler: Handler, raw: bytes,
                        record: Recorded) -> web.StreamResponse:
        path = request.path
        guarded = self.api_key is not None and request.method != "OPTIONS" and path.startswith(_GUARDED_PREFIXES)
        if guarded and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _json_response({"error": "Unauthorized"}, 401)
        fault = self._take_fault(path, raw, record.texts)
        if fault is not None:
            record.fault = fault.name
            if fault.kind == "status":
                if isinstance(fault.body, (str, bytes)):
                    return web.Response(status=fault.status, body=fault.body, headers=fault.headers,
                                        content_type=fault.content_type or "text/plain")
                return _json_response(fault.body, fault.status, fault.headers, fault.content_type)
            if fault.kind == "delay":
                await asyncio.sleep(fault.seconds)  # cancelled if the client goes away (handler_cancellation)
            elif fault.kind in ("drop", "reset") and fault.cut is None:
                if request.transport is not None and fault.kind == "reset":
                    _reset(request.transport)
                elif request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
        request[_RAW_BODY] = raw
        try:
            response = await handler(request)
        except web.HTTPNotFound:
            return _json_response({"detail": "Not Found"}, 404)
        except web.HTTPMethodNotAllowed:
            return _json_response({"detail": "Method Not Allowed"}, 405)
        if fault is not None and fault.kind in ("reset", "truncate"):
            if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
                raise RuntimeError(f"{fault.kind}_next cannot cut a streamed answer")
            content = response.body
            if fault.kind == "truncate":
                kept = content[:len(content) // 2 if fault.cut is None else fault.cut]
                return web.Response(status=response.status, body=kept, content_type=response.content_type)
            await self._reset_mid_body(request, response, content[:fault.cut])
        return response

    @staticmethod
    async def _reset_mid_body(request: web.Request, response: web.Response, part: bytes) -> None:
        """Send the answer's head (with its full length) and ``part`` of its body, then reset."""
        transport = request.transport
        assert transport is not None
        reason = response.reason or HTTPStatus(response.status).phrase
        length = len(response.body) if isinstance(response.body, bytes) else 0
        head = (f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
                f"Content-Length: {length}\r\n\r\n")
        transport.write(head.encode() + part)
        while transport.get_write_buffer_size():  # all in the kernel before the reset
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # let the client read the head, so the reset comes in the middle of the body
        _reset(transport)
        raise asyncio.CancelledError

    # ----------------------------------------------------------------- helpers

    def _json_body(self, request: web.Request) -> dict[str, Any]:
        ctype = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise _validation_error(["Unsupported Media Type: Only 'application/json' is allowed"])
        raw = request.get(_RAW_BODY, b"")
        try:
            body = json.loads(raw)
        except ValueError as e:
            pos = getattr(e, "pos", 0)
            msg = getattr(e, "msg", str(e))
            raise _validation_error([{"type": "json_invalid", "loc": f"body.{pos}", "msg": "JSON decode error",
                                      "input": {}, "ctx": {"error": msg}}]) from None
        if not isinstance(body, dict):
            raise _validation_error([{"type": "model_attributes_type", "loc": "body",
                                      "msg": "Input should be a valid dictionary or object to extract fields from",
                                      "input": body}])
        return body

    def _resolve_model(self, name: str | None) -> tuple[str, int]:
        """Served name and max_model_len for a requested model (404 if unknown)."""
        bases = [m for m in self.models if m.get("parent") is None]
        if name is None:
            card = bases[0]
        else:
            found = [m for m in self.models if m["id"] == name]
            if not found:
                aliases = ", ".join(m["id"] for m in bases)
                raise _ApiError(404, f"The model `{name}` does not exist. Valid aliases: {aliases}.",
                                type_="NotFoundError", param="model")
            card = found[0]
        base = card
        while base.get("parent") is not None:
            base = next((m for m in self.models if m["id"] == base["parent"]), bases[0])
        return card["id"], int(base.get("max_model_len", 1024))

    def _request_id(self, request: web.Request, body: dict[str, Any]) -> str:
        return request.get(_REQUEST_ID) or body.get("request_id") or uuid.uuid4().hex[:16]

    def _seed_part(self, body: dict[str, Any]) -> str:
        with self._lock:
            self._counter += 1
            counter = self._counter
        seed = body.get("seed")
        temperature = body.get("temperature")
        if temperature is not None and temperature < 1e-5:
            return "greedy"
        if seed is not None and seed != -1:
            return f"seed={seed}"
        return f"req={counter}"

    def _check_prompt_failures(self, texts: list[str], max_model_len: int) -> None:
        with self._lock:
            rules = list(self._prompt_failures.items())
        for marker, (status, message) in rules:
            if any(marker in t for t in texts):
                if message is None:
                    n = max_model_len + 1
                    raise _ApiError(status, _context_message(max_model_len, n, at_least=True),
                                    type_=_ERROR_TYPES.get(status), param="input_tokens")
                raise _ApiError(status, message, type_=_ERROR_TYPES.get(status))

    def _check_sampling(self, body: dict[str, Any], n: int) -> None:
        """SamplingParams._verify_args subset (after rendering, as in vLLM)."""
        if n < 1:
            raise _vllm_validation(f"n must be at least 1, got {n}.")
        temperature = body.get("temperature")
        t = 1.0 if temperature is None else temperature
        if t < 0.0:
            raise _vllm_validation(f"temperature must be non-negative, got {t}.", "temperature", t)
        if t > 2.0:
            raise _vllm_validation(f"temperature must be in [0, 2], got {t}.", "temperature", t)
        top_p = body.get("top_p")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise _vllm_validation(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)
        top_k = body.get("top_k")
        if top_k is not None and top_k < -1:
            raise _vllm_validation(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
        min_tokens = body.get("min_tokens") or 0
        if min_tokens < 0:
            raise _vllm_validation(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise _vllm_validation("stop cannot contain an empty string.")
        if t < 1e-5 and n > 1:
            raise _vllm_validation(f"n must be 1 when using greedy sampling, got {n}.")

    def _check_max_tokens(self, max_tokens: int | None, max_model_len: int, min_tokens: int) -> None:
        if max_tokens is not None and max_tokens > max_model_len:
            raise _ApiError(400, f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
                                 "Please request fewer output tokens.", type_="BadRequestError", param="max_tokens")

    def _effective_max_tokens(self, requested: int | None, default: int | None, prompt_len: int,
                              max_model_len: int, min_tokens: int) -> int:
        room = max_model_len - prompt_len
        mt = requested if requested is not None else (default if default is not None else room)
        mt = min(mt, room)
        if mt < 1:
            raise _vllm_validation(f"max_tokens must be at least 1, got {mt}.", "max_tokens", mt)
        if min_tokens > mt:
            raise _vllm_validation(f"min_tokens must be less than or equal to max_tokens={mt}, got {min_tokens}.")
        return mt

    async def _engine(self, sequences: int, texts: list[str]) -> None:
        """Account for in-flight work and sleep ``latency`` (or a slow prompt's time)."""
        with self._lock:
            self.in_flight_requests += 1
            self.in_flight_sequences += sequences
            self.max_in_flight_requests = max(self.max_in_flight_requests, self.in_flight_requests)
            self.max_in_flight_sequences = max(self.max_in_flight_sequences, self.in_flight_sequences)
            slow = [seconds for marker, seconds in self._slow_prompts.items() if any(marker in t for t in texts)]
        delay = max(slow, default=self.latency)
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:  # the client went away: it is no longer in flight
                self._engine_done(sequences, answered=False)
                raise

    def _engine_done(self, sequences: int, answered: bool, texts: list[str] | None = None) -> None:
        with self._lock:
            self.in_flight_requests -= 1
            self.in_flight_sequences -= sequences
            if answered:
                self.completion_requests += 1
                self.answered_prompts.extend(texts or ())

    # ----------------------------------------------------------------- simple routes

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.StreamResponse:
        if not self.version:
            raise _ApiError(404, "Not Found", type_="NotFoundError")
        return _json_response({"version": self.version})

    async def _load(self, request: web.Request) -> web.StreamResponse:
        return _json_response({"server_load": 0})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = []
        for m in self.models:
            lora = m.get("parent") is not None
            card = {
                "id": m["id"], "object": "model", "created": m.get("created", self._created),
                "owned_by": m.get("owned_by", "vllm"),
                "root": m.get("root", m["id"] if lora else str(self.tokenizer_dir)),
                "parent": m.get("parent"),
                "max_model_len": None if lora else int(m.get("max_model_len", 1024)),
                "permission": [{
                    "id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission",
                    "created": self._created, "allow_create_engine": False, "allow_sampling": True,
                    "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                    "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False,
                }],
            }
            if lora:
                card.pop("max_model_len")
            data.append(card)
        return _json_response({"object": "list", "data": data})

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        body = self._json_body(request)
        _validate_fields(body, {"model": "str", "add_special_tokens": "bool", "return_token_strs": "bool",
                                "add_generation_prompt": "bool", "continue_final_message": "bool"})
        _, max_model_len = self._resolve_model(body.get("model"))
        if "messages" in body:
            await self._load_chat_template()
            prompt = self._render_chat(body)
            ids = self._tok.encode(prompt, bool(body.get("add_special_tokens", False)))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise _validation_error([{"type": "missing" if prompt is None else "string_type",
                                          "loc": "body.prompt",
                                          "msg": "Field required" if prompt is None else "Input should be a valid string",
                                          "input": prompt}])
            add = body.get("add_special_tokens")
            ids = self._tok.encode(prompt, True if add is None else bool(add))
        strs = [self._tok.fast.id_to_token(i) for i in ids] if body.get("return_token_strs") else None
        return _json_response({"count": len(ids), "max_model_len": max_model_len, "tokens": list(ids),
                               "token_strs": strs})

    async def _detokenize(self, request: web.Request) -> web.StreamResponse:
        body = self._json_body(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise _validation_error([{"type": "list_type", "loc": "body.tokens", "msg": "Input should be a valid list",
                                      "input": tokens}])
        self._resolve_model(body.get("model"))
        return _json_response({"prompt": self._tok.decode([t for t in tokens if 0 <= t < self._tok.vocab_size])})

    # ----------------------------------------------------------------- completions

    def _parse_prompts(self, body: dict[str, Any]) -> list[tuple[str, tuple[int, ...], bool]]:
        """[(prompt text, token ids, is_token_prompt)] for a completions request."""
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise _vllm_validation("Either prompt or prompt_embeds must be provided and non-empty.")
        add = body.get("add_special_tokens")
        add = True if add is None else bool(add)
        items: list[Any]
        if isinstance(prompt, str):
            items = [prompt]
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            items = list(prompt)
        elif isinstance(prompt, list) and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            items = [prompt]
        elif isinstance(prompt, list) and all(
                isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                for p in prompt):
            items = list(prompt)
        else:
            raise _validation_error([{"type": "string_type", "loc": "body.prompt",
                                      "msg": "Input should be a valid string", "input": prompt}])
        if len(items) > MAX_COMPLETION_PROMPTS:
            raise _validation_error([{"type": "too_long", "loc": "body.prompt",
                                      "msg": f"List should have at most {MAX_COMPLETION_PROMPTS} items after "
                                             f"validation, not {len(items)}", "input": "..."}])
        out = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise _vllm_validation("Either prompt or prompt_embeds must be provided and non-empty.")
                out.append((item, self._tok.encode(item, add), False))
            else:
                if not item:
                    raise _vllm_validation("Either prompt or prompt_embeds must be provided and non-empty.")
                for t in item:
                    if t < 0 or t >= self._tok.vocab_size:
                        raise _vllm_validation(f"Token id {t} is out of vocabulary", "prompt", t)
                out.append((self._tok.decode(item, skip_special_tokens=False), tuple(item), True))
        return out

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = self._json_body(request)
        _validate_fields(body, _COMPLETION_FIELDS)
        model, max_model_len = self._resolve_model(body.get("model"))
        n = 1 if body.get("n") is None else body["n"]
        prompts = [(text, _truncate(ids, body, max_model_len), is_tokens)
                   for text, ids, is_tokens in self._parse_prompts(body)]
        for _text, ids, is_tokens in prompts:
            if len(ids) > max_model_len:
                count = len(ids) if is_tokens else max_model_len + 1
                raise _vllm_validation(_context_message(max_model_len, count, at_least=not is_tokens,
                                                        suffix=False), "input_tokens", count)
        echo = bool(body.get("echo"))
        requested = body.get("max_tokens")
        requested = DEFAULT_MAX_TOKENS if requested is None else requested
        self._check_max_tokens(requested, max_model_len, body.get("min_tokens") or 0)
        self._check_sampling(body, n)
        logprobs = body.get("logprobs")
        if logprobs is not None:
            num = self._tok.vocab_size if logprobs == -1 else logprobs
            if num < 0:
                raise _vllm_validation(f"logprobs must be non-negative or -1, got {logprobs}.", "logprobs", logprobs)
            if num > MAX_LOGPROBS:
                raise _vllm_validation(f"Requested sample logprobs of {num}, which is greater than max allowed: "
                                       f"{MAX_LOGPROBS}", "logprobs", num)
        min_tokens = body.get("min_tokens") or 0
        only_echo = echo and requested == 0
        limits = [0 if only_echo else self._effective_max_tokens(requested, DEFAULT_MAX_TOKENS, len(ids),
                                                                 max_model_len, min_tokens)
                  for _, ids, _ in prompts]
        self._check_prompt_failures([t for t, _, _ in prompts], max_model_len)

        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        seed_part = self._seed_part(body)
        constraint = self._constraint(body)
        sequences = len(prompts) * n
        request_id = f"cmpl-{self._request_id(request, body)}"
        answered = False
        await self._engine(sequences, [t for t, _, _ in prompts])
        try:
            results: list[tuple[int, _Choice]] = []
            for (text, ids, _), limit in zip(prompts, limits, strict=True):
                params = _Params(
                    max_tokens=limit, target_cap=2 * requested, stop=stops,
                    stop_token_ids=list(body.get("stop_token_ids") or []),
                    include_stop=bool(body.get("include_stop_str_in_output")),
                    skip_special=body.get("skip_special_tokens") is not False,
                    ignore_eos=bool(body.get("ignore_eos")), min_tokens=min_tokens, seed_part=seed_part,
                    constraint=constraint)
                tag = _find_tag(text)
                for j in range(n):
                    if only_echo:
                        results.append((len(ids), _Choice("", [], "length", None, "")))
                    else:
                        free = constraint is not None and self._take_break(text)
                        choice = _generate(self._tok, text, j, tag, False, params, free)
                        results.append((len(ids), self._maybe_aborted(text, choice)))
            if body.get("stream"):
                response = await self._streamed(
                    self._stream_completion(request, body, model, request_id, prompts, n, results))
            else:
                response = self._completion_response(body, model, request_id, prompts, n, results, echo)
            answered = True
            return response
        finally:
            self._engine_done(sequences, answered, [t for t, _, _ in prompts])

    def _completion_response(self, body: dict[str, Any], model: str, request_id: str,
                             prompts: list[tuple[str, tuple[int, ...], bool]], n: int,
                             results: list[tuple[int, _Choice]], echo: bool) -> web.Response:
        return_ids = bool(body.get("return_token_ids"))
        logprobs = body.get("logprobs")
        choices = []
        completion_tokens = 0
        for index, (_, choice) in enumerate(results):
            prompt_text, prompt_ids, _ = prompts[index // n]
            text = (prompt_text + choice.text) if echo else choice.text
            choices.append({
                "index": index,
                "text": text,
                "logprobs": (_completion_logprobs(self._tok, choice.ids, logprobs, choice.logprob_seed)
                             if logprobs is not None else None),
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
                "token_ids": list(choice.ids) if return_ids else None,
                "prompt_logprobs": (_prompt_logprobs(self._tok, prompt_ids, body["prompt_logprobs"])
                                    if body.get("prompt_logprobs") is not None else None),
                "prompt_token_ids": list(prompt_ids) if return_ids else None,
                "routed_experts": None,
                "weight_versions": None,
            })
            completion_tokens += len(choice.ids)
        prompt_tokens = sum(len(ids) for _, ids, _ in prompts)
        return _json_response({
            "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "service_tier": None, "system_fingerprint": self._fingerprint,
            "usage": _usage(prompt_tokens, completion_tokens),
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        })

    async def _stream_completion(self, request: web.Request, body: dict[str, Any], model: str, request_id: str,
                                 prompts: list[tuple[str, tuple[int, ...], bool]], n: int,
                                 results: list[tuple[int, _Choice]]) -> web.StreamResponse:
        return_ids = bool(body.get("return_token_ids"))
        logprobs = body.get("logprobs")
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage"))
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        created = int(time.time())
        resp = await _open_sse(request, self.request_id_headers, request.get(_REQUEST_ID) or request_id[5:])
        out = _SSEOut(self, resp)
        pieces = [_split_ids(c.ids) for _, c in results]
        sent_tokens = [0] * len(results)
        sent_chars = [0] * len(results)
        total_chunks = sum(len(p) for p in pieces)
        emitted = 0
        for step in range(max(len(p) for p in pieces)):
            for index, (plen, choice) in enumerate(results):
                if step >= len(pieces[index]):
                    continue
                part = pieces[index][step]
                last = step == len(pieces[index]) - 1
                delta_text = self._tok.decode(part, skip_special_tokens=False) if part else ""
                if last:  # the final text may differ from the plain decode (cut stop string)
                    delta_text = choice.text[sent_chars[index]:]
                chunk: dict[str, Any] = {
                    "id": request_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{
                        "index": index, "text": delta_text,
                        "logprobs": (_completion_logprobs(self._tok, part, logprobs, choice.logprob_seed + str(step),
                                                          sent_chars[index]) if logprobs is not None else None),
                        "finish_reason": choice.finish_reason if last else None,
                        "stop_reason": choice.stop_reason if last else None,
                        "prompt_token_ids": list(prompts[index // n][1]) if return_ids and step == 0 else None,
                        "token_ids": list(part) if return_ids else None,
                    }],
                }
                sent_tokens[index] += len(part)
                sent_chars[index] += len(delta_text)
                emitted += 1
                if continuous:
                    chunk["usage"] = _usage(plen, sent_tokens[index], details=False)
                if emitted == total_chunks and not include_usage:
                    chunk["system_fingerprint"] = self._fingerprint
                await out.send(chunk)
        if include_usage:
            prompt_tokens = sum(len(ids) for _, ids, _ in prompts)
            await out.send({"id": request_id, "object": "text_completion", "created": created, "model": model,
                                   "choices": [], "usage": _usage(prompt_tokens, sum(sent_tokens), details=False),
                            "system_fingerprint": self._fingerprint})
        return await out.done()

    async def _streamed(self, sending: Awaitable[web.StreamResponse]) -> web.StreamResponse:
        """Run a streamed answer; count it as aborted when the client goes away before its end."""
        try:
            return await sending
        except _StreamCut as cut:
            return cut.response
        except (asyncio.CancelledError, ConnectionResetError):
            with self._lock:
                self.streams_aborted += 1
            raise

    # ----------------------------------------------------------------- chat

    async def _load_chat_template(self) -> None:
        """Load the HF tokenizer (first use, ~1-2 s) off the event loop."""
        if self._tok._hf is None:
            await asyncio.get_running_loop().run_in_executor(None, self._tok.hf)

    def _render_chat(self, body: dict[str, Any], *, batch: bool = False) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            if messages is None:
                raise _validation_error([{"type": "missing", "loc": "body.messages", "msg": "Field required",
                                          "input": body}])
            raise _validation_error([{"type": "list_type", "loc": "body.messages", "msg": "Input should be a valid list",
                                      "input": messages}])
        norm = [{**m, "content": _content_text(_checked_parts(m.get("content"), batch))} for m in messages]
        add_gen = body.get("add_generation_prompt")
        kwargs: dict[str, Any] = dict(body.get("chat_template_kwargs") or {})
        kwargs["add_generation_prompt"] = True if add_gen is None else bool(add_gen)
        if body.get("continue_final_message"):
            kwargs["continue_final_message"] = True
        if body.get("chat_template"):
            kwargs["chat_template"] = body["chat_template"]
        from jinja2 import TemplateError

        try:
            return self._tok.render_chat(norm, **kwargs)
        except (TemplateError, ValueError, TypeError, KeyError) as e:  # template errors are 400s in vLLM
            raise _ApiError(400, str(e), type_="BadRequestError") from None

    def _chat_turn(self, body: dict[str, Any], max_model_len: int, n: int, *, batch: bool = False) -> _Turn:
        """One conversation (``body["messages"]``) checked and rendered as vLLM's chat path does (``batch``: as
        its ``/chat/completions/batch`` does); raises its 400s."""
        prompt = self._render_chat(body, batch=batch)
        max_chars = max_model_len * self._tok.max_chars_per_token
        if body.get("truncate_prompt_tokens") is None and len(prompt) > max_chars:
            raise _vllm_validation(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
                f"{len(prompt)} characters (more than {max_chars} characters, which is the upper bound for "
                f"{max_model_len} input tokens). Please reduce the length of the input prompt.",
                "input_text", len(prompt))
        prompt_ids = _truncate(self._tok.encode(prompt, bool(body.get("add_special_tokens", False))), body,
                               max_model_len)
        if len(prompt_ids) > max_model_len:
            raise _vllm_validation(_context_message(max_model_len, len(prompt_ids), at_least=False, suffix=False),
                                   "input_tokens", len(prompt_ids))
        requested = body.get("max_completion_tokens")
        if requested is None:
            requested = body.get("max_tokens")
        self._check_max_tokens(requested, max_model_len, body.get("min_tokens") or 0)
        self._check_sampling(body, n)
        top_logprobs = body.get("top_logprobs")
        want_logprobs = bool(body.get("logprobs"))
        if top_logprobs is not None and top_logprobs != 0 and not want_logprobs:
            raise _vllm_validation("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
        k = top_logprobs or 0
        if want_logprobs:
            num = self._tok.vocab_size if k == -1 else k
            if num > MAX_LOGPROBS:
                raise _vllm_validation(f"Requested sample logprobs of {num}, which is greater than max allowed: "
                                       f"{MAX_LOGPROBS}", "logprobs", num)
        min_tokens = body.get("min_tokens") or 0
        limit = self._effective_max_tokens(requested, None, len(prompt_ids), max_model_len, min_tokens)
        texts = [_content_text(m.get("content")) for m in body["messages"]]
        self._check_prompt_failures(texts, max_model_len)
        tag = next((t for t in (_find_tag(x) for x in reversed(texts)) if t is not None), None)
        stop = body.get("stop")
        params = _Params(
            max_tokens=limit, target_cap=2 * (requested if requested is not None else DEFAULT_MAX_TOKENS),
            stop=[stop] if isinstance(stop, str) else list(stop or []),
            stop_token_ids=list(body.get("stop_token_ids") or []),
            include_stop=bool(body.get("include_stop_str_in_output")),
            skip_special=body.get("skip_special_tokens") is not False,
            ignore_eos=bool(body.get("ignore_eos")), min_tokens=min_tokens, seed_part=self._seed_part(body),
            constraint=self._constraint(body))
        return _Turn(prompt, prompt_ids, params, k, texts, tag)

    def _generate_turn(self, turn: _Turn, n: int) -> list[_Choice]:
        constrained = turn.params.constraint is not None
        return [self._maybe_aborted(turn.prompt, _generate(self._tok, turn.prompt, j, turn.tag, True, turn.params,
                                                           constrained and self._take_break(turn.prompt)))
                for j in range(n)]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = self._json_body(request)
        _validate_fields(body, _CHAT_FIELDS)
        model, max_model_len = self._resolve_model(body.get("model"))
        await self._load_chat_template()
        n = 1 if body.get("n") is None else body["n"]
        turn = self._chat_turn(body, max_model_len, n)
        request_id = f"chatcmpl-{self._request_id(request, body)}"
        answered = False
        await self._engine(n, turn.texts)
        try:
            choices = self._generate_turn(turn, n)
            if body.get("stream"):
                response = await self._streamed(
                    self._stream_chat(request, body, model, request_id, turn.prompt_ids, choices, turn.k))
            else:
                response = self._chat_response(body, model, request_id, turn.prompt_ids, choices, turn.k)
            answered = True
            return response
        finally:
            self._engine_done(n, answered, turn.texts)

    async def _chat_batch(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions/batch`` as vLLM 0.32 serves it: ``messages`` is a list of conversations,
        each answered as choice ``i``; ``n`` must be 1; one bad conversation fails the whole request; ``tools``
        and ``stream`` are ignored without a word; the answer has summed usage and no ``prompt_token_ids``."""
        body = self._json_body(request)
        _validate_fields(body, _CHAT_FIELDS)
        conversations = body.get("messages")
        if not isinstance(conversations, list) or not conversations:
            raise _validation_error([{"type": "missing" if conversations is None else "too_short",
                                      "loc": "body.messages", "msg": "List should have at least 1 item after "
                                      "validation, not 0", "input": conversations}])
        for i, conversation in enumerate(conversations):
            if not isinstance(conversation, list) or not conversation:
                raise _validation_error([{"type": "too_short", "loc": f"body.messages.{i}",
                                          "msg": "List should have at least 1 item after validation, not 0",
                                          "input": conversation}])
        if body.get("use_beam_search"):
            raise _vllm_validation("Batch chat completions do not support beam search. Please set `use_beam_search` "
                                   "to False.", "use_beam_search")
        n = body.get("n", 1)
        if n is not None and n != 1:
            raise _vllm_validation("Batch chat completions do not support `n > 1`. Please set `n` to 1.", "n", n)
        if body.get("tool_choice") not in (None, "none"):
            raise _validation_error([{"type": "literal_error", "loc": "body.tool_choice", "msg": "Input should be "
                                      "'none'", "input": body["tool_choice"], "ctx": {"expected": "'none'"}}])
        model, max_model_len = self._resolve_model(body.get("model"))
        await self._load_chat_template()
        turns = [self._chat_turn({**body, "messages": conversation}, max_model_len, 1, batch=True)
                 for conversation in conversations]
        request_id = f"chatcmpl-{self._request_id(request, body)}"
        texts = [text for turn in turns for text in turn.texts]
        answered = False
        await self._engine(len(turns), texts)
        try:
            return_ids = bool(body.get("return_token_ids"))
            out, completion_tokens = [], 0
            for i, turn in enumerate(turns):
                (c,) = self._generate_turn(turn, 1)
                completion_tokens += len(c.ids)
                out.append({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text, "refusal": None, "annotations": None,
                                "audio": None, "function_call": None,
                                "reasoning": "thinking about choice 0" if self.reasoning_parser else None},
                    "logprobs": _chat_logprobs(self._tok, c.ids, turn.k, c.logprob_seed) if body.get("logprobs") else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": list(c.ids) if return_ids else None,
                    "routed_experts": None,
                })
            usage = _usage(sum(len(turn.prompt_ids) for turn in turns), completion_tokens)
            response = _json_response({
                "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": out, "service_tier": None, "system_fingerprint": self._fingerprint, "usage": usage,
                "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
                "ec_transfer_params": None, "metrics": None,
            })
            answered = True
            return response
        finally:
            self._engine_done(len(turns), answered, [text for turn in turns for text in turn.texts])

    def _chat_response(self, body: dict[str, Any], model: str, request_id: str, prompt_ids: tuple[int, ...],
                       choices: list[_Choice], k: int) -> web.Response:
        return_ids = bool(body.get("return_token_ids"))
        out = []
        tools = body.get("tools") if body.get("tool_choice") != "none" else None
        for j, c in enumerate(choices):
            message = {"role": "assistant", "content": c.text, "refusal": None, "annotations": None,
                       "audio": None, "function_call": None, "reasoning": None}  # no tool call: no tool_calls
            finish_reason = c.finish_reason
            if tools:  # as a server with --tool-call-parser: the model "called" the first tool
                name = tools[0]["function"]["name"]
                message["content"] = None
                message["tool_calls"] = [{"id": f"chatcmpl-tool-{j}", "type": "function",
                                          "function": {"name": name, "arguments": json.dumps({"text": c.text})}}]
                finish_reason = "tool_calls"
            if self.reasoning_parser:
                message["reasoning"] = f"thinking about choice {j}"
            out.append({
                "index": j,
                "message": message,
                "logprobs": _chat_logprobs(self._tok, c.ids, k, c.logprob_seed) if body.get("logprobs") else None,
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
                "token_ids": list(c.ids) if return_ids else None,
                "routed_experts": None,
            })
        return _json_response({
            "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": out, "service_tier": None, "system_fingerprint": self._fingerprint,
            "usage": _usage(len(prompt_ids), sum(len(c.ids) for c in choices)),
            "prompt_logprobs": (_prompt_logprobs(self._tok, prompt_ids, body["prompt_logprobs"])
                                if body.get("prompt_logprobs") is not None else None),
            "prompt_token_ids": list(prompt_ids) if return_ids else None,
            "prompt_text": None, "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        })

    async def _stream_chat(self, request: web.Request, body: dict[str, Any], model: str, request_id: str,
                           prompt_ids: tuple[int, ...], choices: list[_Choice], k: int) -> web.StreamResponse:
        return_ids = bool(body.get("return_token_ids"))
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage"))
        created = int(time.time())
        resp = await _open_sse(request, self.request_id_headers, request.get(_REQUEST_ID) or request_id[9:])
        out = _SSEOut(self, resp)

        def chunk(choice: dict[str, Any], first: bool = False) -> dict[str, Any]:
            data = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [choice]}
            if first and return_ids:
                data["prompt_token_ids"] = list(prompt_ids)
            return data

        tools = body.get("tools") if body.get("tool_choice") != "none" else None
        for j in range(len(choices)):
            await out.send(chunk({"index": j, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}, first=j == 0))
            if self.reasoning_parser:  # as vLLM's reasoning parser: the thinking first, in its own deltas
                for word in ("thinking about", f" choice {j}"):
                    await out.send(chunk({"index": j, "delta": {"reasoning": word}, "logprobs": None,
                                          "finish_reason": None}))
        if tools:  # as vLLM's tool parser: a header delta (id, name), then the arguments in pieces
            name = tools[0]["function"]["name"]
            for j, c in enumerate(choices):
                arguments = json.dumps({"text": c.text})
                await out.send(chunk({"index": j, "delta": {"tool_calls": [{
                    "index": 0, "id": f"chatcmpl-tool-{j}", "type": "function",
                    "function": {"name": name, "arguments": ""}}]}, "logprobs": None, "finish_reason": None}))
                for start in range(0, len(arguments), 8):
                    last = start + 8 >= len(arguments)
                    await out.send(chunk({"index": j, "delta": {"tool_calls": [{
                        "index": 0, "function": {"arguments": arguments[start:start + 8]}}]}, "logprobs": None,
                        "finish_reason": "tool_calls" if last else None}))
            pieces: list[list[list[int]]] = [[] for _ in choices]
        else:
            pieces = [_split_ids(c.ids) for c in choices]
        sent = [0] * len(choices)
        for step in range(max(len(p) for p in pieces)):
            for j, c in enumerate(choices):
                if step >= len(pieces[j]):
                    continue
                part = pieces[j][step]
                last = step == len(pieces[j]) - 1
                text = c.text[sent[j]:] if last else self._tok.decode(part, skip_special_tokens=False)
                sent[j] += len(text)
                choice: dict[str, Any] = {
                    "index": j, "delta": {"content": text},
                    "logprobs": (_chat_logprobs(self._tok, part, k, c.logprob_seed + str(step))
                                 if body.get("logprobs") else None),
                    "finish_reason": c.finish_reason if last else None,
                }
                if last:
                    choice["stop_reason"] = c.stop_reason
                if return_ids:
                    choice["token_ids"] = list(part)
                await out.send(chunk(choice))
        if include_usage:
            await out.send({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                   "model": model, "choices": [],
                                   "usage": _usage(len(prompt_ids), sum(len(c.ids) for c in choices), details=False),
                            "system_fingerprint": self._fingerprint})
        return await out.done()


# --------------------------------------------------------------------------- small helpers


def _context_message(max_model_len: int, count: int, *, at_least: bool, suffix: bool = True) -> str:
    message = (
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
        f"{'at least ' if at_least else ''}{count} input tokens, which exceeds this limit even without any "
        "output tokens. Please reduce the length of the input prompt."
    )
    if suffix:
        message += f" (parameter=input_tokens, value={count})"
    return message


def _usage(prompt_tokens: int, completion_tokens: int, details: bool = True) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                             "completion_tokens": completion_tokens}
    if details:
        usage["prompt_tokens_details"] = None
        usage["completion_tokens_details"] = None
    return usage


def _truncate(ids: tuple[int, ...], body: dict[str, Any], max_model_len: int) -> tuple[int, ...]:
    """vLLM's truncate_prompt_tokens (-1: max_model_len - 1) and truncation_side (default: right)."""
    keep = body.get("truncate_prompt_tokens")
    if keep is None:
        return ids
    if keep > max_model_len:
        raise _vllm_validation(f"truncate_prompt_tokens={keep} cannot be greater than max_model_len={max_model_len}. "
                               "Please request a smaller truncation size.", "truncate_prompt_tokens", keep)
    keep = max_model_len - 1 if keep < 0 else keep
    if len(ids) <= keep:
        return ids
    return ids[-keep:] if body.get("truncation_side") == "left" else ids[:keep]


def _prompt_logprobs(tok: _Tok, ids: tuple[int, ...], k: int) -> list[dict[str, Any] | None]:
    """vLLM's shape: None for the first token, then {token_id: {logprob, rank, decoded_token}} with the
    prompt's own token (its true rank) and the top ``k``."""
    out: list[dict[str, Any] | None] = [None]
    for position, token in enumerate(ids[1:], start=1):
        rng = random.Random(f"plp-{position}-{token}")
        entry = {str(token): {"logprob": -rng.uniform(0.1, 5.0), "rank": rng.randint(1, 5),
                              "decoded_token": tok.decode([token], skip_special_tokens=False)}}
        for rank in range(1, k + 1):
            other = (token + rank) % tok.vocab_size
            entry.setdefault(str(other), {"logprob": -rank * 0.5, "rank": rank,
                                          "decoded_token": tok.decode([other], skip_special_tokens=False)})
        out.append(entry)
    return out


# vLLM 0.32's content part types (as its "Unsupported chat content part type" error lists them).
_PART_TYPES = ("audio_embeds", "audio_url", "image_embeds", "image_pil", "image_url", "input_audio", "input_image",
               "input_text", "output_text", "prompt_embeds", "refusal", "text", "thinking", "tool_reference",
               "video_embeds", "video_url")


def _checked_parts(content: Any, batch: bool) -> Any:
    """A message's content parts checked as vLLM 0.32 does: a type it does not know is a 400 naming ``type``; a
    media part without its payload (``{"type": "input_audio"}``) fails pydantic's validation, a 400 with no param
    on ``/chat/completions``, while ``/chat/completions/batch`` answers the conversation as if the message had no
    content (its validation consumes the parts: vLLM 0.32's behaviour, measured)."""
    if not isinstance(content, list):
        return content
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _PART_TYPES:
            raise _vllm_validation(f"Unsupported chat content part type: {kind!r}. Supported types: "
                                   f"{', '.join(_PART_TYPES)}.", "type", kind)
    for part in content:
        if part["type"] != "text" and part["type"] not in part:
            if batch:
                return []
            raise _ApiError(400, f"1 validation error for ValidatorIterator\n0.{part['type']}\n  Field required "
                                 f"[type=missing, input_value={part!r}, input_type=dict]", type_="BadRequestError")
    return content


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def _split_ids(ids: list[int], size: int = 3) -> list[list[int]]:
    if not ids:
        return [[]]
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _open_sse(request: web.Request, echo_id: bool, request_id: str) -> web.StreamResponse:
    headers = {"Content-Type": "text/event-stream; charset=utf-8"}
    if echo_id:
        headers["X-Request-Id"] = request_id
    resp = web.StreamResponse(status=200, headers=headers)
    await resp.prepare(request)
    return resp


class _StreamCut(Exception):
    """An injected mid-stream error was sent: the answer ends there."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("stream cut")
        self.response = response


class _SSEOut:
    """Writes one streamed answer's chunks, paced by ``slow_streams`` and cut by ``fail_next_stream``."""

    def __init__(self, fake: FakeVLLM, resp: web.StreamResponse) -> None:
        self.resp = resp
        with fake._lock:
            self.delay = fake._stream_delay
            self.error = fake._stream_errors.popleft() if fake._stream_errors else None
            self.cut = fake._stream_cuts.popleft() if fake._stream_cuts else None
        self.sent = 0

    async def send(self, data: dict[str, Any]) -> None:
        if self.cut is not None and self.sent >= self.cut:
            await self.resp.write_eof()
            raise _StreamCut(self.resp)
        if self.error is not None and self.sent >= self.error[0]:
            await self.resp.write(_sse(self.error[1]))  # vLLM: the error event, then [DONE]
            await self.done()
            raise _StreamCut(self.resp)
        if self.delay and self.sent:
            await asyncio.sleep(self.delay)
        await self.resp.write(_sse(data))
        self.sent += 1

    async def done(self) -> web.StreamResponse:
        await self.resp.write(b"data: [DONE]\n\n")
        await self.resp.write_eof()
        return self.resp


def _json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None,
                   content_type: str | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(), headers=headers,
                        content_type=content_type or "application/json")


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close a connection with a TCP RST (SO_LINGER 0), as a crashed peer or a middlebox does."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]
