"""The HTTP client the SDK sends through: the capacity gate, send-once where a retry cannot help, and a
connection pool sized to the process's open-file limit.

The openai SDK does the HTTP, retries and timeouts; this module only wraps its aiohttp-backed client:
event hooks that count server capacity, and a transport wrapper that ends the SDK's retries where sending
again cannot help.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import errno
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx2
import openai

from .errors import causes

__all__ = ["Capacity", "HTTPClient", "Ticket", "http_client", "refused", "ticket"]

logger = logging.getLogger("vllmclient")

_KEEPALIVE_SECONDS = 4.0
"""Idle pooled connections are dropped after this: below uvicorn's (so vLLM's) 5 s keep-alive, so a request is
not sent on a connection the server is closing at that very moment (a spurious dropped connection)."""


class Capacity:
    """An async counting limiter over sequences (prompts × n); FIFO, so no caller starves."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, amount: int) -> int:
        """Wait until ``amount`` is free and take it; returns what was taken (an amount over the limit
        takes the whole limit, so one prompt whose n exceeds it runs alone)."""
        amount = min(amount, self.limit)
        if not self._waiters and self.used + amount <= self.limit:
            self.used += amount
            return amount
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(amount)  # granted just as we were cancelled
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._wake()  # those queued behind it may fit now
            raise
        return amount

    def release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            amount, future = self._waiters[0]
            if future.done():  # cancelled while queued: takes nothing, and must not block those behind it
                self._waiters.popleft()
                continue
            if self.used + amount > self.limit:
                break
            self._waiters.popleft()
            self.used += amount
            future.set_result(None)


class Ticket:
    """One request's claim on the server's capacity.

    Taken when the SDK hands the built request to the transport and given back when the answer's
    headers arrive (httpx2 event hooks), so the SDK's own work on either side overlaps other requests'
    time on the server instead of leaving slots idle. A retry after an error answer queues again; one
    after a connection error (no answer) keeps its slots through the SDK's back-off. A streamed answer
    (``until_closed``) keeps its slots past a successful answer's headers, until whoever reads it leaves.
    """

    __slots__ = ("amount", "capacity", "entered", "held", "seconds", "until_closed")

    def __init__(self, capacity: Capacity, amount: int, *, until_closed: bool = False) -> None:
        self.capacity, self.amount = capacity, amount
        self.until_closed = until_closed
        self.held = False
        self.entered = 0.0
        self.seconds: float | None = None

    async def enter(self) -> None:
        if not self.held:
            self.amount = await self.capacity.acquire(self.amount)
            self.held = True
        self.entered = time.perf_counter()  # a retry's back-off is not the server's time

    def leave(self) -> None:
        if self.held:
            self.held = False
            self.capacity.release(self.amount)
            self.seconds = time.perf_counter() - self.entered


ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("vllmclient_ticket", default=None)
"""The capacity claim of the request being sent from this task (set by the engine around each post)."""


async def _on_request(request: httpx2.Request) -> None:
    claim = ticket.get()
    if claim is not None:
        await claim.enter()


async def _on_response(response: httpx2.Response) -> None:
    claim = ticket.get()
    if claim is not None and not (claim.until_closed and response.status_code < 400):
        claim.leave()


_SAFE_OPEN_FILES = 1024
"""A soft open-file limit below this is raised to it (within the hard limit): it is Linux's default, and
descriptors stay below select()'s FD_SETSIZE, so nothing else in the process can break."""


def _connection_budget() -> int:
    """How many connections one client may hold open: half the process's open-file limit, at most the SDK's
    default; a soft limit below ``_SAFE_OPEN_FILES`` (macOS's is 256) is raised toward it first."""
    most = openai.DEFAULT_CONNECTION_LIMITS.max_connections or 1000
    try:
        import resource
    except ImportError:  # Windows: sockets are not counted against a file limit
        return most
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < _SAFE_OPEN_FILES:
        wanted = _SAFE_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, _SAFE_OPEN_FILES)
        if wanted > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                logger.debug("vllmclient: raised the soft open-file limit from %d to %d", soft, wanted)
                soft = wanted
            except (ValueError, OSError):  # e.g. a sandbox that forbids it: the budget below still holds
                pass
    return most if soft == resource.RLIM_INFINITY else max(1, min(most, soft // 2))


class _SendOnce(httpx2.AsyncBaseTransport):
    """Stops the SDK's retries where sending again cannot help; everything else goes to the SDK as is.

    - No answer within ``timeout``: the server was generating. vLLM aborts a request whose client went
      away, so a re-send starts the generation from scratch, at the back of the queue, and will most
      likely need as long again: with the SDK's retries a 130 s generation under ``timeout=120`` ran 7
      times (15 minutes) before failing. Sent once, it fails after ``timeout`` with advice to raise it.
    - A TLS certificate that fails verification fails the same way a few seconds later.
    - With several replicas (``refused`` set), a refused connection: nothing listens there any more, and
      another replica can take the request now rather than after the SDK's back-off (``_replicas``).

    Raising an ``openai.OpenAIError`` is how: the SDK passes those on without retrying. Connection errors
    (refused, dropped: a restart, a stale pooled connection) and 408/409/429/5xx answers keep the retries.
    """

    def __init__(self, transport: httpx2.AsyncBaseTransport) -> None:
        self.transport = transport
        self.refused: Callable[[openai.APIConnectionError], None] | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            return await self.transport.handle_async_request(request)
        except httpx2.ReadTimeout as exc:
            raise openai.APITimeoutError(request=request) from exc
        except httpx2.TransportError as exc:
            if any(isinstance(cause, ssl.SSLCertVerificationError) for cause in causes(exc)):
                raise openai.APIConnectionError(request=request) from exc
            if self.refused is not None and refused(exc):
                error = openai.APIConnectionError(request=request)
                error.__cause__ = exc
                self.refused(error)
                raise error from exc
            raise

    async def aclose(self) -> None:
        await self.transport.aclose()


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a refused connection (nothing listens there): nothing was sent."""
    return any(isinstance(cause, ConnectionRefusedError) or f"[Errno {errno.ECONNREFUSED}]" in str(cause)
               for cause in causes(exc))


class HTTPClient(openai.DefaultAioHttpClient):
    """The SDK's aiohttp-backed client with every transport (proxied ones too) wrapped in ``_SendOnce``.

    ``connections`` is the size of its connection pool: the engine never has more requests in flight, so a
    request holding server slots never waits for a connection (nor has that wait count against ``timeout``).
    """

    connections: int

    def on_refused(self, callback: Callable[[openai.APIConnectionError], None]) -> None:
        """A refused connection is reported to ``callback`` and not retried by the SDK (see ``_SendOnce``)."""
        for transport in [self._transport, *self._mounts.values()]:
            if isinstance(transport, _SendOnce):
                transport.refused = callback

    def _init_transport(self, *args: Any, **kwargs: Any) -> httpx2.AsyncBaseTransport:
        return _SendOnce(super()._init_transport(*args, **kwargs))

    def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> httpx2.AsyncBaseTransport:
        return _SendOnce(super()._init_proxy_transport(*args, **kwargs))


def http_client(kwargs: dict[str, Any] | None, *, replicas: int = 1) -> HTTPClient:
    """The SDK's aiohttp-backed HTTP client, with the hooks that count capacity, sized to the open-file limit.

    The hooks run before the user's own: a request hook (e.g. one that signs) then runs just before the
    send, and a slow response hook does not keep the server's slots. ``limits`` in ``kwargs`` wins over
    the default pool size, but the engine still keeps its requests within the open-file budget. With
    several ``replicas`` (one such client each) each gets an equal part of the budget.
    """
    kwargs = dict(kwargs or {})
    user = kwargs.pop("event_hooks", None) or {}
    hooks = {
        "request": [_on_request, *user.get("request", ())],
        "response": [_on_response, *user.get("response", ())],
    }
    budget = max(1, _connection_budget() // replicas)
    if "limits" not in kwargs:
        default = openai.DEFAULT_CONNECTION_LIMITS
        kwargs["limits"] = httpx2.Limits(
            max_connections=budget,
            max_keepalive_connections=min(budget, default.max_keepalive_connections or budget),
            keepalive_expiry=_KEEPALIVE_SECONDS,
        )
    client = HTTPClient(event_hooks=hooks, **kwargs)
    client.connections = min(budget, kwargs["limits"].max_connections or budget)
    return client
