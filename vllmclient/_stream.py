"""Streaming one generation: SSE chunks from the server → typed events, as they arrive.

The request is the one ``agenerate`` would send (same typed parameters, same per-input preparation) with
``stream: true``; it goes through the SDK (``AsyncOpenAI.post(..., stream=True)``), under the same capacity
gate, and errors are translated as for every other call. Unlike a plain request, a stream keeps its share
of ``max_concurrency`` (and its connection) until it ends or is closed: the server works on it all along.
Closing the stream early closes the HTTP connection, and vLLM aborts a request whose client went away.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx2
import openai

from ._request import Request
from ._responses import chat_logprobs, completion_logprobs
from .errors import APIError, ConnectionLostError, InvalidInputError, ServerTimeoutError, aborted, causes
from .results import Logprob

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["StreamEnd", "StreamEvent", "TextDelta", "check_streamable", "stream_events"]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New output, in the order the server sent it.

    ``text`` is the next piece of the answer (may be ``""`` when only ``reasoning`` or ``tool_calls``
    came). On the chat path (``tokenizer=None``): ``reasoning`` is the next piece of the thinking text the
    server's reasoning parser split off, ``tool_calls`` the OpenAI tool-call deltas as sent (``index``,
    then ``id`` and ``function.name`` once, ``function.arguments`` in pieces). ``logprobs``: when
    requested, the top tokens of each token in this piece.
    """

    text: str
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: list[list[Logprob]] | None = None


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last event: how the generation ended.

    ``text`` is the whole answer (the deltas joined). ``finish_reason`` is vLLM's (``"stop"``,
    ``"length"``, ``"tool_calls"``, ...). Token counts are the server's. ``time_to_first_token`` and
    ``latency`` are seconds from the request's send (after any wait for a free slot of
    ``max_concurrency``) to the first non-empty delta (``None`` if none came) and to the end.
    ``request_id`` is the ``X-Request-Id`` the request carried (vLLM's log names the request after it).
    With ``structured_outputs``: ``parsed`` is the checked value (the JSON decoded, the pydantic model, the
    matched text) and ``validation_error`` says why the text fails the check (``None`` when it passes),
    as ``agenerate``'s ``parsed`` and ``validation_errors``; both ``None`` without ``structured_outputs``.
    """

    text: str
    finish_reason: str | None
    input_tokens: int | None
    output_tokens: int | None
    time_to_first_token: float | None
    latency: float
    request_id: str
    parsed: Any = None
    validation_error: str | None = None


StreamEvent = TextDelta | StreamEnd


def check_streamable(request: Request) -> None:
    """Refuse, before sending, what a stream cannot do."""
    if request.n != 1:
        raise InvalidInputError(
            f"num_generations={request.n} is invalid for streaming: a stream carries one generation (deltas of "
            "several would arrive interleaved). Call stream() once per generation (with seed=... for distinct "
            "ones), or use agenerate(..., num_generations=n) for the complete texts."
        )
    if request.structured_retries:
        raise InvalidInputError(
            f"structured_outputs_retries={request.structured_retries} is invalid for streaming: an invalid "
            "generation cannot be re-asked once its text has been streamed. Use agenerate(...) for checked and "
            "re-asked output, or stream with structured_outputs_retries=0 (the output is still constrained)."
        )
    if request.prompt_logprobs is not None:
        raise InvalidInputError(
            "prompt_logprobs is not supported by stream()/astream(): use agenerate(..., prompt_logprobs=k)."
        )


async def stream_events(engine: Engine, request: Request, payload: Any) -> AsyncGenerator[StreamEvent]:
    """Send one prepared input with ``stream: true`` and yield its events; runs on the client's loop.

    The ``ticket`` context variable is set only around the SDK's send (where the capacity hooks run), so the
    generator may be advanced from different tasks (the sync ``stream()`` steps it one task per event).
    """
    if request.chat:
        path, body = "/chat/completions", request.with_messages(payload)
    else:
        path, body = "/completions", request.with_prompts([payload])
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    request_id = f"vllmclient-{uuid.uuid4().hex}"
    # A replica that fails the request before the answer begins cools down and the request goes to one it has
    # not tried (``Replicas.send``): nothing of the answer came, so nothing is repeated. Once open, it is not re-sent.
    replica, claim, chunks = await engine.replicas.send(
        request.n, request_id, lambda replica: replica.aclient.post(
            path, cast_to=object, body=body, stream=True, stream_cls=openai.AsyncStream[object],
            options={"headers": {"X-Request-Id": request_id}},
        ), until_closed=True,
    )
    try:
        sent = claim.entered
        read = _read_chat if request.chat else _read_completion
        pieces: list[str] = []
        first: float | None = None
        finish_reason: str | None = None
        usage: dict[str, Any] = {}
        counted = 0
        async for chunk in chunks:
            if not isinstance(chunk, dict):
                raise APIError(f"the server's stream sent an unexpected chunk: {str(chunk)[:200]}", request_id=request_id)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                try:
                    delta, ids, reason = read(choice, request)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    raise APIError(
                        f"the server's stream sent a chunk of an unexpected shape ({exc.__class__.__name__}: "
                        f"{exc}): {str(chunk)[:200]}", request_id=request_id,
                    ) from exc
                counted += ids
                finish_reason = reason or finish_reason
                if delta is not None:
                    if first is None:
                        first = time.perf_counter()
                    pieces.append(delta.text)
                    yield delta
        end = time.perf_counter()
        output_tokens = usage.get("completion_tokens", counted if counted else None)
        if finish_reason is None or finish_reason == "abort":  # vLLM ends every answer with a reason; abort: stopping
            ended = (_unfinished(chunks, replica.base_url, request_id, len(pieces)) if finish_reason is None
                     else aborted(replica.base_url, request_id, output_tokens))
            engine.replicas.failed(replica, ended)  # as a dropped stream: several replicas, it cools down
            raise ended
        text = "".join(pieces)
        parsed, validation_error = (None, None) if request.structured is None else request.structured.check(
            text, finish_reason
        )
        yield StreamEnd(
            text=text,
            finish_reason=finish_reason,
            input_tokens=usage.get("prompt_tokens"),
            output_tokens=output_tokens,
            time_to_first_token=None if first is None else first - sent,
            latency=end - sent,
            request_id=request_id,
            parsed=parsed,
            validation_error=validation_error,
        )
    except (openai.OpenAIError, OSError) as exc:
        error = replica.translate(exc)
        if isinstance(error, ConnectionLostError):  # the SDK re-sends no stream once open
            root = causes(exc)[-1]
            error = ConnectionLostError(
                f"The connection to the vLLM server at {replica.base_url} dropped in the middle of the streamed "
                f"answer ({root.__class__.__name__}: {root}); the text received so far is incomplete. The server "
                "crashed or restarted? Check its log."
            )
        elif isinstance(error, ServerTimeoutError):  # the stream was open: not a slow first answer
            timeout = replica.aclient.timeout
            seconds = timeout.read if isinstance(timeout, httpx2.Timeout) else timeout
            error = ServerTimeoutError(
                f"The vLLM server at {replica.base_url} sent nothing for timeout={seconds} seconds in the middle of "
                "the streamed answer; the text received so far is incomplete, and the request was not re-sent. A "
                "server that stalls mid-answer is overloaded or hung: check its log (timeout bounds each wait for "
                "the next piece of a stream)."
            )
        if isinstance(error, APIError):
            error.request_id = error.request_id or request_id
            engine.replicas.failed(replica, error)  # several replicas: it cools down; a stream once open is not re-sent
        raise error from exc
    finally:
        try:
            await chunks.close()  # left early: the connection is closed mid-answer, and vLLM aborts the request
        finally:
            claim.leave()
            replica.connections.release(1)


def _unfinished(chunks: openai.AsyncStream[Any], base_url: str, request_id: str, pieces: int) -> APIError:
    """The error of a stream that ended without a finish reason: it was cut, or it was no stream at all."""
    kind = chunks.response.headers.get("content-type", "")
    if not kind.startswith("text/event-stream"):
        return APIError(
            f"The server at {base_url} answered the streamed request with HTTP 200 and content type {kind!r}, not an "
            "event stream: a proxy in the way, or a server that does not stream? Check base_url.",
            request_id=request_id,
        )
    return ConnectionLostError(
        f"The streamed answer from the vLLM server at {base_url} ended before the answer did (no finish reason, "
        f"after {pieces} pieces): the text received so far is incomplete. A proxy closed it, or the server "
        "restarted? Check its log.",
        request_id=request_id,
    )


def _read_completion(choice: dict[str, Any], request: Request) -> tuple[TextDelta | None, int, str | None]:
    """A /v1/completions stream choice → (its delta or None when empty, its token count, its finish reason)."""
    text = choice.get("text") or ""
    ids = choice.get("token_ids")
    logprobs = completion_logprobs(choice.get("logprobs")) if request.logprobs is not None else None
    delta = TextDelta(text, logprobs=logprobs) if text or logprobs else None
    return delta, len(ids) if ids else 0, choice.get("finish_reason")


def _read_chat(choice: dict[str, Any], request: Request) -> tuple[TextDelta | None, int, str | None]:
    """A /v1/chat/completions stream choice → (its delta or None when empty, its token count, its finish reason)."""
    message = choice.get("delta") or {}
    text = message.get("content") or ""
    reasoning = message.get("reasoning") or message.get("reasoning_content")  # the older name
    tool_calls = message.get("tool_calls") or None
    logprobs = chat_logprobs(choice.get("logprobs")) or None if request.logprobs is not None else None
    ids = choice.get("token_ids")
    has = text or reasoning or tool_calls or logprobs
    delta = TextDelta(text, reasoning=reasoning, tool_calls=tool_calls, logprobs=logprobs) if has else None
    return delta, len(ids) if ids else 0, choice.get("finish_reason")
