"""Several vLLM servers of one model behind one client: shares of ``max_concurrency``, routing, cool-down.

Each replica has its own SDK client (its own HTTP, retries and timeouts), its own connection pool and its own
share of ``max_concurrency``. A request waits until some replica has room and goes to the one with the most
free room at that moment, so a slow replica takes fewer requests and one that is down takes none. A replica
whose request failed where another server may do better (refused, dropped, 5xx or 429 after the SDK's retries,
an unreadable answer, a key or model it no longer takes, a timeout) is cooled down: nothing is sent to it
until a probe (``GET /health`` and ``GET /v1/models``, no retries, with back-off) finds it healthy and serving
the model again. The request that failed goes to a replica it has not tried yet, at most once to each
(routing, not a retry loop: the SDK retried on each replica already), except after a timeout: that generation
would most likely take as long again elsewhere. A refused connection is not even retried by the SDK
(``_http._SendOnce``): nothing listens there any more, so the replica cools down and the request goes
elsewhere at once; as nothing was sent, it is not a try, and the request may go back there once the replica
answers again. With every replica down, requests wait up to ``timeout`` seconds for one to come back, then
fail with ``ServerUnreachableError``.

With a single ``base_url`` there is one replica and nothing of this applies: a request's capacity is taken
when the SDK hands it to the transport (``_http.Ticket``), exactly as without this module.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2
import openai

from ._http import Capacity, HTTPClient, Ticket, refused, ticket
from ._server import ServerInfo, discover, parse_models
from .errors import (
    APIError,
    AuthenticationError,
    ConfigurationError,
    ConnectionLostError,
    ModelNotFoundError,
    ServerError,
    ServerTimeoutError,
    ServerUnreachableError,
    VLLMClientError,
    from_openai,
    unreadable_answer,
)

__all__ = ["Replica", "Replicas", "Route", "Total", "discover_all", "shares"]

logger = logging.getLogger("vllmclient")

T = TypeVar("T")

PROBE_FIRST_SECONDS = 0.25
"""The first probe of a cooled-down replica comes this soon (a restart's blip), then the wait doubles ..."""
PROBE_MOST_SECONDS = 5.0
"""... up to this: a replica back from a restart rejoins within a few seconds, at one cheap GET per wait."""

# Failures of a replica rather than of the request: another replica may answer it.
_REPLICA_FAILURES = (ServerUnreachableError, ConnectionLostError, ServerError, ServerTimeoutError)


def _replica_failure(error: APIError) -> bool:
    """Whether another replica may do better: also after a 429 (a rate limit in front of this one, still there
    after the SDK's retries), an answer that is not readable JSON (cut short, a proxy's page) and a key or model
    it no longer takes (restarted with another; its probe lets it rejoin once it takes them again). Not a 404
    without vLLM's error object: a path the server does not serve (``/chat/completions/batch`` before vLLM had it)."""
    if isinstance(error, (*_REPLICA_FAILURES, AuthenticationError)):
        return True
    if isinstance(error, ModelNotFoundError):
        return isinstance(error.body, dict) and "type" in error.body
    return type(error) is APIError and error.status_code is not None and (error.status_code < 400 or error.status_code == 429)


class _Share(Capacity):
    """A replica's share of ``max_concurrency``; says when room frees up, so waiting requests are routed."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.on_release: Callable[[], None] | None = None

    def free(self) -> int:
        """Room a new request may take now (none while requests re-sent by the SDK are queued here)."""
        return -1 if self._waiters else self.limit - self.used

    def release(self, amount: int) -> None:
        super().release(amount)
        if self.on_release is not None:
            self.on_release()


class Total:
    """Several capacities seen as one (``limit`` and ``used`` summed), for sizing and for tests."""

    def __init__(self, parts: list[Capacity]) -> None:
        self.parts = parts

    @property
    def limit(self) -> int:
        return sum(part.limit for part in self.parts)

    @property
    def used(self) -> int:
        return sum(part.used for part in self.parts)


class Replica:
    """One server: its SDK client, connection budget, share of the capacity and health."""

    def __init__(
        self, aclient: openai.AsyncOpenAI, transport: HTTPClient, *, base_url: str, connections: int, share: int
    ) -> None:
        self.aclient = aclient
        self.transport = transport
        self.base_url = base_url
        self.served_models: list[str] = []
        self.slots = _Share(share)
        self.connections = Capacity(connections)  # requests in flight: at most one per pooled connection
        self.down_since: float | None = None  # time.monotonic() when cooled down; None: healthy
        self.why: str = ""  # what made it cool down

    async def get(self, path: str) -> Any:
        return await self.call(self.aclient.get(path, cast_to=httpx2.Response))

    async def call(self, sending: Awaitable[httpx2.Response]) -> Any:
        """The answer's JSON, without the SDK's model parsing; errors are ours, naming this replica."""
        try:
            response = await sending
        except (openai.OpenAIError, OSError) as exc:  # OSError: e.g. out of file descriptors, under the SDK
            raise self.translate(exc) from exc
        try:
            return json.loads(response.content)
        except ValueError as exc:
            raise APIError(
                unreadable_answer(self.base_url, response.status_code, response.content),
                status_code=response.status_code,
                request_id=response.headers.get("x-request-id"),
            ) from exc

    def translate(self, exc: BaseException) -> VLLMClientError:
        """Ours for an SDK exception (or an ``OSError`` from under the SDK)."""
        timeout = self.aclient.timeout
        seconds = timeout.read if isinstance(timeout, httpx2.Timeout) else timeout
        return from_openai(exc, base_url=self.base_url, served_models=self.served_models, timeout=seconds)


@dataclass
class Route:
    """One request's way through the replicas."""

    tried: list[Replica] = field(default_factory=list)  # those it reached and that failed it
    failure: APIError | None = None  # the last of those failures
    waiting_since: float | None = None  # when it first found every replica down


class Replicas:
    """Routes each request to a replica; see the module's docstring."""

    def __init__(self, replicas: Sequence[Replica], *, timeout: float) -> None:
        self.replicas = list(replicas)
        self.timeout = timeout
        self.model = ""  # the served model, checked again when a replica rejoins
        self._waiters: collections.deque[tuple[int, list[Replica], asyncio.Future[tuple[Replica, int] | None]]] = (
            collections.deque()
        )
        self._probes: set[asyncio.Task[None]] = set()
        self._all_down_logged = False
        if len(self.replicas) > 1:
            for replica in self.replicas:
                replica.slots.on_release = self._wake
                replica.transport.on_refused(functools.partial(self._refused, replica))

    @property
    def single(self) -> bool:
        return len(self.replicas) == 1

    @property
    def share(self) -> int:
        """The smallest replica's share of ``max_concurrency``: what packs are sized for."""
        return min(replica.slots.limit for replica in self.replicas)

    @property
    def capacity(self) -> Capacity | Total:
        return self.replicas[0].slots if self.single else Total([replica.slots for replica in self.replicas])

    @property
    def connections(self) -> Capacity | Total:
        return self.replicas[0].connections if self.single else Total([r.connections for r in self.replicas])

    async def take(
        self, sequences: int, route: Route | None = None, *, until_closed: bool = False
    ) -> tuple[Replica, Ticket]:
        """A replica for a request of ``sequences``, with its connection taken and its claim on the capacity.

        One replica: the claim is taken when the SDK sends (``_http.Ticket``). Several: a share is taken here,
        on the replica with the most free room among those the ``route`` has not tried, waiting for room if
        need be. A request fails with its last failure once only replicas it tried are up.
        """
        if self.single:
            (replica,) = self.replicas
            await replica.connections.acquire(1)
            return replica, Ticket(replica.slots, sequences, until_closed=until_closed)
        replica, amount = await self._room(sequences, route or Route())
        try:
            await replica.connections.acquire(1)
        except BaseException:
            replica.slots.release(amount)
            raise
        claim = Ticket(replica.slots, amount, until_closed=until_closed)
        claim.held, claim.entered = True, time.perf_counter()
        return replica, claim

    async def send(
        self, sequences: int, request_id: str, sending: Callable[[Replica], Awaitable[T]], *, until_closed: bool = False
    ) -> tuple[Replica, Ticket, T]:
        """``sending(replica)`` on a replica ``take`` chose, under its claim; what it returned, still holding the
        claim and the connection (the caller leaves them once done with the answer).

        A failure is ours (translated, carrying ``request_id``); one where another replica may do better sends
        the request to a replica it has not tried (``failed``), having given back what it held.
        """
        route = Route()
        while True:
            replica, claim = await self.take(sequences, route, until_closed=until_closed)
            token = ticket.set(claim)
            try:
                return replica, claim, await sending(replica)
            except BaseException as exc:
                claim.leave()
                replica.connections.release(1)
                if not isinstance(exc, (openai.OpenAIError, OSError, VLLMClientError)):
                    raise
                error = exc if isinstance(exc, VLLMClientError) else replica.translate(exc)
                if isinstance(error, APIError):
                    error.request_id = error.request_id or request_id
                    if self.failed(replica, error, route):
                        continue
                if error is exc:
                    raise
                raise error from exc
            finally:
                ticket.reset(token)

    def failed(self, replica: Replica, error: APIError, route: Route | None = None) -> bool:
        """Note that ``replica`` failed a request with ``error``; whether to send it to another replica.

        A refused connection reached nothing, so it is not a try: the request may go there again once the
        replica is back. Others count: at most one send to each replica, and none after a timeout.
        """
        if self.single or not _replica_failure(error):
            return False
        self.cool_down(replica, error)
        if route is None or isinstance(error, ServerTimeoutError):
            return False
        if not refused(error):
            route.tried.append(replica)
        route.failure = error
        return any(other not in route.tried for other in self.replicas)

    def _refused(self, replica: Replica, error: openai.APIConnectionError) -> None:
        """Nothing listens at the replica any more: cool it down at once (its transport stops the SDK's
        retries, so the requests on their way there come back to be routed elsewhere)."""
        failure = replica.translate(error)
        if isinstance(failure, APIError):
            self.cool_down(replica, failure)

    def cool_down(self, replica: Replica, error: APIError) -> None:
        if self.single or replica.down_since is not None:
            return
        replica.down_since = time.monotonic()
        replica.why = f"{error.__class__.__name__}: {error.message}"
        logger.warning(
            "vllmclient: replica %s failed (%s); its requests go to the other replicas until it answers again",
            replica.base_url, replica.why,
        )
        probe = asyncio.get_running_loop().create_task(self._probe(replica))
        self._probes.add(probe)
        probe.add_done_callback(self._probes.discard)
        self._wake(everyone=True)  # waiters re-check: maybe every replica is down now

    async def _probe(self, replica: Replica) -> None:
        """Until the replica is healthy and serves the model again, with doubling waits; then it rejoins."""
        ticket.set(None)  # this task was started from a request's context: its probes take no capacity
        wait = PROBE_FIRST_SECONDS
        wrong = False  # it was found serving another model (said once)
        root = replica.base_url.removesuffix("/v1")
        options: openai.RequestOptions = {"max_retries": 0, "timeout": min(self.timeout, PROBE_MOST_SECONDS)}
        while True:
            await asyncio.sleep(wait)
            wait = min(2 * wait, PROBE_MOST_SECONDS)
            try:
                await replica.aclient.get(root + "/health", cast_to=httpx2.Response, options=options)  # 200: ready
                models = await replica.call(replica.aclient.get("/models", cast_to=httpx2.Response, options=options))
                names = [card.id for card in parse_models(models)]
            except (openai.OpenAIError, OSError, VLLMClientError) as exc:
                logger.debug("vllmclient: replica %s still down (%s)", replica.base_url, exc)
                continue
            if self.model and self.model not in names:
                logger.log(logging.DEBUG if wrong else logging.WARNING,
                           "vllmclient: replica %s is back but serves %s, not %r: not used",
                           replica.base_url, ", ".join(names) or "no model", self.model)
                wrong = True
                continue
            replica.down_since = None
            self._all_down_logged = False
            logger.warning("vllmclient: replica %s answers again and takes requests", replica.base_url)
            self._wake(everyone=True)
            return

    async def _room(self, sequences: int, route: Route) -> tuple[Replica, int]:
        """Wait for room on a healthy replica the route has not tried. With every replica down, at most until
        ``timeout`` seconds after the last went down, and ``timeout`` seconds in all for this route."""
        tried = route.tried
        while True:
            if not self._waiters:
                picked = self._pick(sequences, tried)
                if picked is not None:
                    return picked
            candidates = [replica for replica in self.replicas if replica not in tried]
            limit: float | None = None
            if all(replica.down_since is not None for replica in candidates):
                if route.failure is not None and (not candidates or any(r.down_since is None for r in self.replicas)):
                    raise route.failure  # the replicas that are up failed this request already
                now = time.monotonic()
                route.waiting_since = route.waiting_since or now
                since = min(max(replica.down_since or 0.0 for replica in self.replicas), route.waiting_since)
                limit = since + self.timeout - now
                if limit <= 0:
                    raise self._all_down()
                if not self._all_down_logged:
                    self._all_down_logged = True
                    logger.warning(
                        "vllmclient: every replica is down (%s); waiting up to %.0f s for one to answer again",
                        self._reasons(), limit,
                    )
            future: asyncio.Future[tuple[Replica, int] | None] = asyncio.get_running_loop().create_future()
            entry = (sequences, tried, future)
            self._waiters.append(entry)
            try:
                await asyncio.wait([future], timeout=limit)
            except BaseException:  # cancelled
                self._forget(entry)
                raise
            if not future.done():  # the wait for a replica to come back ran out: the loop raises
                self._forget(entry)
            elif (granted := future.result()) is not None:
                return granted

    def _forget(self, entry: tuple[int, list[Replica], asyncio.Future[tuple[Replica, int] | None]]) -> None:
        """A waiter leaves: give back room granted to it just now, or let those queued behind it go first."""
        future = entry[2]
        if entry in self._waiters:
            self._waiters.remove(entry)
        if future.done() and not future.cancelled() and (granted := future.result()) is not None:
            replica, amount = granted
            replica.slots.release(amount)
        else:
            future.cancel()
            self._wake()

    def _pick(self, sequences: int, tried: list[Replica]) -> tuple[Replica, int] | None:
        """Take room now on the healthy untried replica with the most, if any has enough."""
        best: Replica | None = None
        most = 0
        for replica in self.replicas:
            if replica.down_since is not None or replica in tried:
                continue
            free = replica.slots.free()
            if free >= min(sequences, replica.slots.limit) and (best is None or free > most):
                best, most = replica, free
        if best is None:
            return None
        amount = min(sequences, best.slots.limit)
        best.slots.used += amount
        return best, amount

    def _wake(self, *, everyone: bool = False) -> None:
        """Grant waiters in order while room fits them; ``everyone``: the rest re-check (health changed)."""
        for entry in list(self._waiters):
            sequences, tried, future = entry
            if future.done():
                self._waiters.remove(entry)
                continue
            picked = self._pick(sequences, tried)
            if picked is not None or everyone:
                self._waiters.remove(entry)
                future.set_result(picked)

    def stop(self) -> None:
        """Stop probing (the client is closing, or its load failed)."""
        for probe in self._probes:
            probe.cancel()

    def _reasons(self) -> str:
        return "; ".join(f"{replica.base_url}: {replica.why}" for replica in self.replicas
                         if replica.down_since is not None)

    def _all_down(self) -> ServerUnreachableError:
        return ServerUnreachableError(
            f"Not sent: no replica answered for timeout={self.timeout:g} seconds ({self._reasons()}). Start the "
            "servers and run the call again; with checkpoint=... only the inputs that are missing are sent."
        )


def shares(max_concurrency: int, replicas: int) -> list[int]:
    """``max_concurrency`` split as evenly as can be, at least 1 each."""
    return [max(1, max_concurrency // replicas + (i < max_concurrency % replicas)) for i in range(replicas)]


async def discover_all(router: Replicas, wanted: str | None) -> tuple[ServerInfo, str]:
    """``discover`` on every replica: each must serve the model; one that cannot be reached starts cooled down.

    The replica with the smallest context length stands for all (a prompt checked against it fits each).
    """
    found = await asyncio.gather(
        *(discover(replica, replica.base_url, wanted) for replica in router.replicas), return_exceptions=True
    )
    answered: list[tuple[Replica, ServerInfo, str]] = []
    down: list[tuple[Replica, APIError]] = []
    for replica, result in zip(router.replicas, found, strict=True):
        if isinstance(result, _REPLICA_FAILURES) and not router.single:
            down.append((replica, result))
        elif isinstance(result, BaseException):
            raise result
        else:
            answered.append((replica, *result))
    if not answered:
        raise ServerUnreachableError(
            f"None of the {len(down)} servers in base_url could be reached: "
            + "; ".join(f"{replica.base_url}: {error.message}" for replica, error in down)
        )
    first, _, name = answered[0]
    for replica, info, other in answered:
        if other != name:
            raise ConfigurationError(
                f"The servers in base_url serve different models: {first.base_url} serves {name!r}, "
                f"{replica.base_url} serves {other!r}. base_url lists replicas of one model: remove "
                "the other server, or pass model=... if both serve it."
            )
        replica.served_models = info.names
    lengths = {replica.base_url: info.max_model_len(name) for replica, info, _ in answered}
    _, server, _ = min(answered, key=lambda found: lengths[found[0].base_url] or 1 << 62)
    if len(set(lengths.values())) > 1:
        logger.warning("vllmclient: the replicas' context lengths differ (%s); prompts are checked against the "
                       "smallest", ", ".join(f"{url}: {length}" for url, length in lengths.items()))
    router.model = name
    for replica, error in down:
        replica.served_models = server.names
        router.cool_down(replica, error)
    return server, name
