"""The exceptions vllmclient raises, as one tree, so callers can catch as narrowly as they need.

::

    VLLMClientError                  anything raised by vllmclient
    ├── ConfigurationError           a setting or the environment cannot work (also ValueError)
    ├── InvalidInputError            a conversation or a sampling parameter is malformed (also ValueError)
    ├── APIError                     the server answered with an error, or could not be reached
    │   ├── ServerUnreachableError   could not connect (refused, unknown host, TLS), after the SDK's retries
    │   ├── ConnectionLostError      the connection dropped before the answer was complete, after the retries
    │   ├── ServerTimeoutError       no answer within ``timeout`` seconds; sent once, never re-sent
    │   ├── AuthenticationError      401/403: missing or wrong API key
    │   ├── ModelNotFoundError       404: the model is not served
    │   ├── BadRequestError          400/422: the server rejected the request
    │   │   └── PromptTooLongError   a prompt exceeds the model's context (also raised before sending)
    │   └── ServerError              5xx, after the SDK's retries
    ├── GenerationFailedError        strict mode: some inputs failed; holds every failure
    └── LocalServerError             the local vLLM server would not start or died

And one warning, ``UnknownFieldWarning`` (a ``UserWarning``): an ``extra_body`` key vLLM does not read,
which it would ignore without a word.

Every ``APIError`` keeps the server's own ``message``, the HTTP ``status_code`` and the ``request_id``
when the server sent one; the SDK exception it wraps is its ``__cause__``. A process out of file
descriptors is a ``ConfigurationError`` (a local limit), not the server's failure.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .results import GenerationError

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConnectionLostError",
    "GenerationFailedError",
    "InvalidInputError",
    "LocalServerError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "ServerError",
    "ServerTimeoutError",
    "ServerUnreachableError",
    "UnknownFieldWarning",
    "VLLMClientError",
]


class UnknownFieldWarning(UserWarning):
    """An ``extra_body`` key vLLM does not read: it would be ignored without a word (HTTP 200)."""


class VLLMClientError(Exception):
    """Base class of every exception vllmclient raises."""


class ConfigurationError(VLLMClientError, ValueError):
    """A setting cannot work: an invalid field, a tokenizer without a chat template, an ambiguous model, ...

    Also a ValueError, as pydantic's ValidationError (which it replaces for invalid fields) is.
    """


class InvalidInputError(VLLMClientError, ValueError):
    """An input conversation or a sampling parameter is malformed; nothing was sent for it."""


class LocalServerError(VLLMClientError):
    """The local vLLM server failed to start or stopped unexpectedly; the message holds its log tail."""


class APIError(VLLMClientError):
    """The server answered with an error, or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        self.body = body


class ServerUnreachableError(APIError):
    """No connection could be made (refused, unknown host, TLS failure), after the SDK's retries."""


class ConnectionLostError(APIError):
    """The connection dropped before the answer was complete (the server crashed or restarted), after retries."""


class ServerTimeoutError(APIError):
    """The server did not answer within ``timeout`` seconds; the request was sent once."""


class AuthenticationError(APIError):
    """The server wants an API key (``vllm serve --api-key``) and got none or a wrong one."""


class ModelNotFoundError(APIError):
    """The requested model is not among the served ones; ``served_models`` lists those."""

    def __init__(self, message: str, *, served_models: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.served_models = list(served_models)


class BadRequestError(APIError):
    """The server rejected the request as malformed (HTTP 400 or 422)."""


class PromptTooLongError(BadRequestError):
    """A prompt does not fit the model's context; ``max_model_len`` and ``prompt_tokens`` say by how much."""

    def __init__(
        self,
        message: str,
        *,
        max_model_len: int | None = None,
        prompt_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.max_model_len = max_model_len
        self.prompt_tokens = prompt_tokens


class ServerError(APIError):
    """The server failed (HTTP 5xx) and the SDK's retries did not help."""


class GenerationFailedError(VLLMClientError):
    """Raised at the end of a strict bulk call: the other inputs finished, these did not."""

    def __init__(
        self, failures: Sequence[GenerationError], total: int, *, results: Sequence[Any] = ()
    ) -> None:
        self.failures = list(failures)
        self.total = total
        self.results = list(results)  # every input's output, failed ones included: nothing is lost
        lines = failure_lines(self.failures, 10, more=" (see .failures)")
        super().__init__("\n".join([f"{len(self.failures)} of {total} inputs failed:", *lines]))

    def __reduce__(self) -> Any:  # survives pickling (multiprocessing workers)
        return (self.__class__, (self.failures, self.total), {"results": self.results})


def aborted(base_url: str, request_id: str | None, output_tokens: int | None) -> ServerError:
    """vLLM answers the requests in flight when it shuts down (SIGTERM) or is paused with HTTP 200, finish reason
    ``"abort"`` and the text so far: an incomplete answer, so a failure (a checkpointed call sends it again)."""
    after = "" if output_tokens is None else f", after {output_tokens} tokens"
    return ServerError(
        f"The vLLM server at {base_url} aborted this generation before it finished (finish_reason 'abort'{after}), "
        "as it does with the requests in flight when it shuts down or is paused; the text so far is incomplete "
        "and not returned. Send the input again (generate with checkpoint=..., or a job file's same command run "
        "again, sends only what is missing).",
        request_id=request_id,
    )


def failure_lines(failures: Sequence[GenerationError], shown: int, *, more: str = "") -> list[str]:
    """One line per failure (index, type, message) for the first ``shown``, then how many more."""
    lines = [f"  input {failure.index}: {failure.type}: {failure.message}" for failure in failures[:shown]]
    if len(failures) > shown:
        lines.append(f"  ... and {len(failures) - shown} more{more}")
    return lines


_CONTEXT_NUMBERS = re.compile(
    r"maximum context length is (\d+) tokens.*?contains (?:at least )?(\d+) input tokens", re.DOTALL
)
# vLLM's cheap check before tokenizing (the chat path's usual answer for a long prompt): characters, not tokens.
_CONTEXT_CHARACTERS = re.compile(r"maximum context length is (\d+) tokens.*?contains (\d+) characters", re.DOTALL)
# A prompt of exactly max_model_len tokens leaves no room for output: vLLM clamps max_tokens to 0, then refuses it.
_NO_ROOM = re.compile(r"max_tokens must be at least 1, got (-?\d+)")


def _prompt_too_long(server_message: str, common: dict[str, Any]) -> PromptTooLongError | None:
    fix = " Shorten this input, pass truncate_prompt_tokens=..., or serve the model with a larger --max-model-len."
    if match := _CONTEXT_NUMBERS.search(server_message):
        return PromptTooLongError(
            server_message + fix, max_model_len=int(match.group(1)), prompt_tokens=int(match.group(2)), **common
        )
    if match := _CONTEXT_CHARACTERS.search(server_message):
        return PromptTooLongError(server_message + fix, max_model_len=int(match.group(1)), **common)
    if _NO_ROOM.search(server_message):
        return PromptTooLongError(
            f"The prompt fills the model's whole context, leaving no room for a single output token (the server "
            f"said: {server_message}).{fix}",
            **common,
        )
    return None


def from_openai(
    exc: BaseException, *, base_url: str, served_models: Sequence[str] = (), timeout: float | None = None
) -> VLLMClientError:
    """Translate an openai SDK exception (or an ``OSError`` from under it) into ours, keeping the server's
    words and status; ``timeout`` is the client's, for the message of a request that outlasted it."""
    import openai

    if isinstance(exc, (openai.APIConnectionError, OSError)):  # APIConnectionError includes APITimeoutError
        return _network_error(exc, base_url, timeout)
    body = getattr(exc, "body", None)
    if not isinstance(exc, openai.APIStatusError):
        if isinstance(body, dict) and isinstance(body.get("code"), int):  # vLLM's error event in a stream
            message = body.get("message")
            return _status_error(
                body["code"], _words(message if isinstance(message, str) and message else str(exc)), body=body,
                request_id=None, base_url=base_url, served_models=served_models, html=False,
                mid_stream=True,
            )
        return APIError(str(exc) or exc.__class__.__name__, body=body)
    server_message = body.get("message") if isinstance(body, dict) else body
    if not isinstance(server_message, str) or not server_message:
        server_message = exc.response.text or exc.message
    return _status_error(
        exc.status_code, _words(server_message), body=body, request_id=exc.request_id, base_url=base_url,
        served_models=served_models, html=_is_html(exc.response.text),
    )


def _status_error(
    status: int,
    server_message: str,
    *,
    body: Any,
    request_id: str | None,
    base_url: str,
    served_models: Sequence[str],
    html: bool,
    mid_stream: bool = False,
) -> VLLMClientError:
    """Ours for an error the server answered with ``status`` (or sent as a stream's error event)."""
    common: dict[str, Any] = {"status_code": status, "request_id": request_id, "body": body}
    if mid_stream and status >= 500:
        return ServerError(
            f"The vLLM server failed in the middle of the streamed answer ({status}: {server_message}); the "
            "text received so far is incomplete. Check the server's log for this request id.",
            **common,
        )
    if status in (401, 403):
        return AuthenticationError(
            f"The vLLM server at {base_url} refused the API key (HTTP {status}: {server_message}). "
            "Pass api_key=... or set VLLM_API_KEY to the key the server was started with (--api-key).",
            **common,
        )
    if status == 404:
        hint = f" Served models: {', '.join(served_models)}." if served_models else ""
        if isinstance(body, dict) and body.get("param") == "model" or "does not exist" in server_message:
            return ModelNotFoundError(
                f"{server_message}{hint} Pass model=... with one of the served names.",
                served_models=served_models,
                **common,
            )
        return ModelNotFoundError(
            f"HTTP 404 from {base_url}: {server_message}. Is base_url the vLLM server's address "
            "(e.g. http://localhost:8000/v1)?",
            served_models=served_models,
            **common,
        )
    if status in (400, 413, 422):
        too_long = _prompt_too_long(server_message, common)
        if too_long is not None:
            return too_long
        return BadRequestError(f"The server rejected the request (HTTP {status}): {server_message}", **common)
    if status >= 500:
        who = "A proxy in front of the vLLM server" if html else "The vLLM server"
        return ServerError(f"{who} failed (HTTP {status}): {server_message}", **common)
    if status == 429:
        return APIError(
            f"HTTP 429 from {base_url}, still after the SDK's retries: {server_message}. Something in front of the "
            "server limits the request rate (vLLM itself does not answer 429): lower max_concurrency, or raise "
            "max_retries to wait longer.",
            **common,
        )
    return APIError(f"HTTP {status} from {base_url}: {server_message}", **common)


_MESSAGE_CHARACTERS = 500
"""An error answer longer than this (a proxy's whole HTML page) is cut: every error record would carry it."""


def _is_html(text: str) -> bool:
    start = text.lstrip()[:15].lower()
    return start.startswith(("<!doctype html", "<html"))


def _words(text: str) -> str:
    """The server's words, readable: an HTML page becomes its title and text, anything long is cut."""
    if _is_html(text):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        body = re.sub(r"<[^>]+>", " ", re.sub(r"(?is)<(script|style|head)[^>]*>.*?</\1>", " ", text))
        text = "an HTML page: " + " ".join(((title.group(1) + " | ") if title else "") .split() + body.split())
    return text if len(text) <= _MESSAGE_CHARACTERS else text[: _MESSAGE_CHARACTERS - 3] + "..."


def unreadable_answer(base_url: str, status: int, content: bytes) -> str:
    """The message for an answer that is not JSON: cut short (a dropped connection, a proxy's size limit), or
    not JSON at all (a proxy's or another service's page)."""
    text = content.decode("utf-8", "replace")
    if text.lstrip()[:1] in ("{", "["):
        return (
            f"{base_url} answered HTTP {status} with JSON that is cut short or damaged ({len(content)} bytes, "
            f"ending {text[-60:]!r}): the connection dropped mid-answer, or a proxy limits the answer's size."
        )
    return (
        f"{base_url} answered HTTP {status} with something that is not JSON ({_words(text)[:200]!r}); is base_url "
        "the vLLM server itself (e.g. http://localhost:8000/v1), not a proxy or another service?"
    )


def _network_error(exc: BaseException, base_url: str, timeout: float | None) -> VLLMClientError:
    """Name a failure without an answer by its root cause, found down the ``__cause__`` chain.

    The SDK's aiohttp transport reports every connection error as ``ConnectTimeout`` and the SDK then
    raises ``APITimeoutError``, so the exception itself says little; aiohttp's and the OS's errors under
    it say what happened.
    """
    import aiohttp
    import httpx2
    import openai

    chain = causes(exc)

    def find(*types: type[BaseException]) -> Any:
        return next((e for e in reversed(chain) if isinstance(e, types)), None)  # the innermost: the OS's

    detail = f"{chain[-1].__class__.__name__}: {chain[-1]}"
    parts = urlsplit(base_url)
    seconds = f"timeout={timeout:g}" if timeout is not None else "timeout"
    for error in chain:
        if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
            return ConfigurationError(
                f"this process ran out of file descriptors (open-file limit {_open_file_limit()}): raise it with "
                "`ulimit -n 4096` in the shell that starts Python, or lower max_concurrency "
                f"({error.__class__.__name__}: {error})"
            )
    if certificate := find(ssl.SSLCertVerificationError):
        return ServerUnreachableError(
            f"The vLLM server at {base_url} could not be reached: its TLS certificate failed verification "
            f"({certificate.verify_message or certificate}). If you trust it, pass httpx_client_kwargs="
            "{'verify': ssl.create_default_context(cafile='server-ca.pem')}; if the server speaks plain HTTP "
            "(vLLM does unless started with --ssl-certfile), use http:// in base_url."
        )
    if handshake := find(ssl.SSLError):
        return ServerUnreachableError(
            f"The vLLM server at {base_url} could not be reached: the TLS handshake failed "
            f"({handshake.reason or handshake}). Is the server serving HTTPS? vLLM serves plain HTTP unless "
            f"started with --ssl-keyfile/--ssl-certfile: try base_url='http://{parts.netloc}{parts.path}'."
        )
    if find(socket.gaierror):
        return ServerUnreachableError(
            f"The vLLM server at {base_url} could not be reached: the host name {parts.hostname!r} could not be "
            f"resolved ({detail}). Check its spelling, or use the server's IP address."
        )
    if find(ConnectionRefusedError) or any(f"[Errno {errno.ECONNREFUSED}]" in str(e) for e in chain):
        return ServerUnreachableError(
            f"The vLLM server at {base_url} could not be reached: the connection was refused (nothing listens "
            f"on {parts.netloc}). Is it running? Start one with `vllm serve <model>` (or vllmclient.LocalServer) "
            "and check the host and port in base_url."
        )
    if find(aiohttp.ConnectionTimeoutError, httpx2.PoolTimeout) or (
        isinstance(chain[-1], httpx2.ConnectTimeout)  # httpx2's own transport: a real connect timeout
    ):
        return ServerUnreachableError(
            f"The vLLM server at {base_url} could not be reached: no connection within {seconds} seconds "
            f"({detail}). Check the host and port in base_url, and that no firewall drops the connection."
        )
    if find(aiohttp.SocketTimeoutError, httpx2.ReadTimeout):
        return ServerTimeoutError(
            f"The vLLM server at {base_url} did not answer within {seconds} seconds. The request was not "
            "re-sent: a generation that outlasted the timeout would most likely take as long again. For long "
            "generations raise timeout= (e.g. ClientvLLM(..., timeout=600)) or lower max_new_tokens; if even "
            "loading (GET /v1/models) times out, the server is hung or busy starting: check its log."
        )
    if find(aiohttp.ClientConnectorError, httpx2.ConnectError):
        return ServerUnreachableError(
            f"The vLLM server at {base_url} could not be reached ({detail}). Check base_url and that the server "
            "is running and reachable from here."
        )
    if find(aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError,
            httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError, ConnectionError):
        return ConnectionLostError(
            f"The connection to the vLLM server at {base_url} dropped before the answer was complete ({detail}), "
            "on every attempt (1 + max_retries). The server crashed or restarted? Check its log; with "
            "generate(..., checkpoint=...) a re-run sends only the inputs that failed."
        )
    if not isinstance(exc, openai.APIConnectionError):  # an OSError from under the SDK, not about the server
        return APIError(f"Sending to the vLLM server at {base_url} failed in this process ({detail})")
    return ServerUnreachableError(
        f"The vLLM server at {base_url} could not be reached ({exc.__class__.__name__}: {exc}; {detail}). "
        "Is it running? Start one with `vllm serve <model>` (or vllmclient.LocalServer) and check base_url."
    )


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _open_file_limit() -> str:
    try:
        import resource
    except ImportError:  # Windows
        return "unknown"
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
