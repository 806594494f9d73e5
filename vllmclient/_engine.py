"""Bulk generation: bounded concurrency, prompt packing with splitting, per-input isolation.

The hot path, run once per prompt, is: prepare (render + checks) → pack → one POST per pack →
unpack the choices. Keep per-prompt work here small and measured (benchmarks/run.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

import httpx2

from ._http import Capacity
from ._replicas import Replicas, Total
from ._request import Request
from ._responses import batch_chat_outputs, chat_output, completion_alone, completion_outputs, read
from .errors import (
    APIError,
    BadRequestError,
    InvalidInputError,
    PromptTooLongError,
    ServerError,
    ServerUnreachableError,
    VLLMClientError,
    aborted,
)
from .results import GenerateOutput, GenerationError, failed_output, replace_generations
from .structured import invalid_slots

logger = logging.getLogger("vllmclient")

Prepare = Callable[[int, Any], Any]
"""Turns input ``index`` into what is sent (a prompt str or token ids, or messages for chat); raises
VLLMClientError."""

PACK_CAP = 32
"""Most prompts per request; beyond this the client saves little CPU and packs hold slots longer."""

TARGET_REQUESTS_PER_SECOND = 10.0
"""Adaptive packing aims at about this many HTTP requests per second: each costs the client ~1-2 ms of SDK
CPU and the vLLM API server about as much; measured best on the real server (benchmarks/real_server.py)."""

# 400s whose ``param`` names one of these are about the prompts, so splitting the pack finds the culprit;
# any other named parameter (temperature, logprobs, ...) is wrong for every prompt alike.
_INPUT_PARAMS = frozenset({"input_tokens", "input_text", "prompt", "messages"})


class PackSizer:
    """How many prompts go in the next request.

    Packing cuts the client's CPU per prompt (the SDK costs about 1 ms per HTTP request whatever its
    size), but a pack returns only when its longest generation ends, holding the slots of the others.
    So packs shrink as requests get slow: the target is ~TARGET_REQUESTS_PER_SECOND requests, which
    keeps SDK overhead low, and at least 4 requests in flight so the server never waits on the client.
    Successive sizes differ by at most one and add up to the slots, so in steady state no slot is left over.
    """

    def __init__(self, fixed: int | None) -> None:
        self.fixed = fixed
        self.latency: float | None = None  # exponentially weighted mean seconds per request
        self._turn = 0

    def size(self, slots: int) -> int:
        if self.fixed is not None:
            return max(1, min(self.fixed, slots))
        size = max(1, min(PACK_CAP, slots // 4))
        if self.latency is not None:
            size = max(1, min(size, math.ceil(slots / (self.latency * TARGET_REQUESTS_PER_SECOND))))
        packs = math.ceil(slots / size)
        self._turn = (self._turn + 1) % packs
        return slots // packs + (self._turn < slots % packs)

    def observe(self, seconds: float) -> None:
        self.latency = seconds if self.latency is None else 0.8 * self.latency + 0.2 * seconds


class Engine:
    """Sends prepared prompts for one client; lives on the client's private loop."""

    def __init__(self, replicas: Replicas, *, pack_size: int | None) -> None:
        self.replicas = replicas
        self.sizer = PackSizer(pack_size)
        self.batch_chat = True  # False once the server answered that it has no POST /chat/completions/batch

    @property
    def capacity(self) -> Capacity | Total:
        """``max_concurrency``: the one server's capacity, or the replicas' shares together."""
        return self.replicas.capacity

    @property
    def connections(self) -> Capacity | Total:
        return self.replicas.connections

    @property
    def base_url(self) -> str:
        """The server's address (several: all of them), for messages."""
        return ", ".join(replica.base_url for replica in self.replicas.replicas)

    async def post(self, path: str, body: dict[str, Any], sequences: int) -> tuple[Any, str, float | None, str | None]:
        """One request through the SDK (its retries and timeouts), JSON decoded without model parsing.

        ``sequences`` is what the request holds of the capacity while the server works on it. A connection
        is taken first, before any slot (several replicas: just after, as room chooses the replica), and kept
        until the answer is read: the pool never makes it wait.
        The request carries an ``X-Request-Id`` of ours (vLLM names the request after it in its log, and in
        the answer's ``id``); it is returned with the data and set on any error, so every result can be traced.
        Also returned: the seconds from the send (of the last attempt) to the answer, and with several replicas
        the one that answered (a request a replica failed goes to another one: ``Replicas.failed``).
        """
        request_id = f"vllmclient-{uuid.uuid4().hex}"
        replica, claim, data = await self.replicas.send(
            sequences, request_id, lambda replica: replica.call(replica.aclient.post(
                path, cast_to=httpx2.Response, body=body, options={"headers": {"X-Request-Id": request_id}}
            )),
        )
        claim.leave()
        replica.connections.release(1)
        if claim.seconds is not None:
            self.sizer.observe(claim.seconds)
        return data, request_id, claim.seconds, None if self.replicas.single else replica.base_url

    async def one(self, payload: Any, request: Request) -> GenerateOutput:
        """A single input; errors are raised (agenerate's contract)."""
        output = (await self._generate([payload], request))[0]
        if (error := self._aborted(output)) is not None and self._elsewhere():
            output = (await self._generate([payload], request))[0]  # the aborting replica is cooled down
            error = self._aborted(output)
        if error is not None:
            raise error
        if request.structured is not None:
            await self._checked([(0, payload, output)], request)
        return output

    def packs(self, request: Request) -> bool:
        """Whether several inputs may share a request: always for prompts, for conversations when the server
        has ``/chat/completions/batch`` and the request is one it carries (see ``Request.packs_conversations``)."""
        return not request.chat or (request.packs_conversations and self.batch_chat)

    async def _generate(self, payloads: list[Any], request: Request) -> list[GenerateOutput]:
        """One request for these payloads (several conversations only if ``packs``); errors are raised.

        A lone conversation goes to ``/chat/completions``, whose answer has its exact input token count.
        """
        if request.chat and len(payloads) == 1:
            (messages,) = payloads
            data, request_id, seconds, server = await self.post(
                "/chat/completions", request.with_messages(messages), request.n
            )
            outputs = [read(chat_output, data, request, request_id)]
            if request.keep_answer:
                outputs[0]["answer"] = data
        elif request.chat:
            data, request_id, seconds, server = await self.post(
                "/chat/completions/batch", request.with_conversations(payloads), len(payloads)
            )
            outputs = read(batch_chat_outputs, data, len(payloads), request, request_id)
        else:
            data, request_id, seconds, server = await self.post(
                "/completions", request.with_prompts(payloads), len(payloads) * request.n
            )
            outputs = read(completion_outputs, data, len(payloads), request, request_id)
            if request.keep_answer:
                for output, answer in zip(outputs, read(completion_alone, data, len(payloads), request.n), strict=True):
                    output["answer"] = answer
        for output in outputs:
            if seconds is not None:
                output["latency"] = seconds
            if server is not None:
                output["server"] = server
        return outputs

    async def stream(
        self, items: Iterable[tuple[int, Any]], request: Request, prepare: Prepare
    ) -> AsyncGenerator[list[tuple[int, GenerateOutput]]]:
        """Yield batches of ``(index, output)`` as packs complete; inputs are read at most a pack ahead of room.

        The client's shared capacity counts what the server is working on (see ``_http.Ticket``), so other
        calls, even ones made from inside this stream's consumer, go on. This stream's window bounds
        everything it holds: packs built and waiting for capacity (up to one capacity's worth, so a
        freed slot never waits on the client), packs on the server, and results not yet taken from here.
        So a slow consumer slows the producer and memory stays flat however many inputs there are.
        """
        done: asyncio.Queue[Any] = asyncio.Queue()
        end = object()
        window = Capacity(2 * self.capacity.limit)
        unit = min(request.n, self.capacity.limit)  # what one prompt holds; a huge n runs alone
        sending: set[asyncio.Task[None]] = set()
        # Set when a request could not connect even after the SDK's retries, until one gets through: the
        # rest of this call fails at once (a checkpoint resumes it) instead of in waves of max_concurrency.
        unreachable: list[ServerUnreachableError] = []

        async def send(pack: list[tuple[int, Any]]) -> None:
            try:
                if unreachable:  # the server is gone: do not spend the SDK's back-off on every pack in turn
                    results = [(index, _failed(index, request, _not_sent(unreachable[0]))) for index, _ in pack]
                else:
                    results = await self._send_pack(pack, request)
                    if self.replicas.single:  # several: the replicas wait for one to answer again (_replicas)
                        _note_reachability(results, unreachable)
                    if request.structured is not None:
                        sent = [(index, payload, output) for (index, payload), (_, output) in zip(pack, results, strict=True)]
                        await self._checked(sent, request)
            except Exception as exc:  # noqa: BLE001 - whatever went wrong fails this pack, never the whole job
                results = [(index, _failed(index, request, exc)) for index, _ in pack]
            done.put_nowait((results, len(pack) * unit))  # from here the consumer releases the window
            sending.discard(asyncio.current_task())

        async def produce() -> None:
            slots = max(1, self.replicas.share // unit)  # packs sized for one server (of several: its share)
            iterator = iter(items)
            ready: collections.deque[tuple[int, Any, GenerateOutput | None]] = collections.deque()
            exhausted = False
            while True:
                size = self.sizer.size(slots) if self.packs(request) else 1
                # Prepare the next pack while the server is busy: rendering is then off the path from a
                # freed slot to the next request.
                while not exhausted and len(ready) < size:
                    try:
                        index, item = next(iterator)
                    except StopIteration:
                        exhausted = True
                        break
                    try:
                        ready.append((index, prepare(index, item), None))
                    except Exception as exc:  # noqa: BLE001 - a bad input fails itself, never its neighbours
                        ready.append((index, None, _failed(index, request, as_input_error(index, exc))))
                if not ready:
                    break
                size = min(size, len(ready))
                await window.acquire(size * unit)  # rejected inputs use room too: reading stays lazy
                pack: list[tuple[int, Any]] = []
                rejected: list[tuple[int, GenerateOutput]] = []
                for _ in range(size):
                    index, payload, failure = ready.popleft()
                    if failure is None:
                        pack.append((index, payload))
                    else:
                        rejected.append((index, failure))
                if rejected:
                    done.put_nowait((rejected, len(rejected) * unit))
                if pack:
                    sending.add(asyncio.create_task(send(pack)))
                    await asyncio.sleep(0)  # let the SDK build this request before preparing the next
            while sending:
                await asyncio.wait(set(sending))

        async def run_producer() -> None:
            try:
                await produce()
            except BaseException as exc:  # e.g. the caller's input generator raised
                done.put_nowait(exc)
                raise
            finally:
                done.put_nowait(end)

        producer = asyncio.create_task(run_producer())
        try:
            while True:
                item = await done.get()
                if item is end:
                    break
                if isinstance(item, BaseException):
                    raise item
                results, windowed = item
                window.release(windowed)
                yield results
        finally:
            producer.cancel()
            for task in sending:
                task.cancel()
            await asyncio.gather(producer, *sending, return_exceptions=True)  # each gives back its capacity

    async def _send_pack(
        self, pack: list[tuple[int, Any]], request: Request, *, again: bool = False
    ) -> list[tuple[int, GenerateOutput]]:
        """Send a pack; when one of its prompts may be the cause, split it so that only the guilty inputs fail.

        A 400 about the prompts (their length, whatever ``param`` vLLM names, or their content), or a
        failure on our side before an answer (a prompt the request could not carry), is split; a 400 about
        a call-wide parameter (temperature, logprobs, ...) or a server failure fails the pack as it is.
        Conversations that may not share a request (any more: a server without ``/chat/completions/batch``
        says so with a 404 once) go one per request. Generations a replica aborted go once more to another
        (``again``: this is that second send).
        """
        if len(pack) > 1 and not self.packs(request):
            parts = await asyncio.gather(*(self._send_pack([item], request, again=again) for item in pack))
            return [result for part in parts for result in part]
        groups = _sharing(pack, request) if len(pack) > 1 else [pack]
        if len(groups) > 1:
            parts = await asyncio.gather(*(self._send_pack(group, request, again=again) for group in groups))
            by_index = dict(result for part in parts for result in part)
            return [(index, by_index[index]) for index, _ in pack]
        try:
            outputs = await self._generate([payload for _, payload in pack], request)
        except APIError as exc:  # includes an answer we cannot read
            if request.chat and len(pack) > 1 and _no_route(exc):
                if self.batch_chat:
                    self.batch_chat = False
                    logger.info("vllmclient: %s has no POST /chat/completions/batch; one request per conversation",
                                self.base_url)
                return await self._send_pack(pack, request, again=again)
            if len(pack) == 1 or not _about_a_prompt(exc):
                return [(index, _failed(index, request, exc)) for index, _ in pack]
        except Exception as exc:  # noqa: BLE001 - ours, before any answer: find the input that caused it
            if len(pack) == 1:
                return [(index, _failed(index, request, exc)) for index, _ in pack]
        else:
            return await self._unless_aborted(pack, outputs, request, again)
        middle = len(pack) // 2
        left, right = await asyncio.gather(
            self._send_pack(pack[:middle], request, again=again), self._send_pack(pack[middle:], request, again=again)
        )
        return left + right

    async def _unless_aborted(
        self, pack: list[tuple[int, Any]], outputs: list[GenerateOutput], request: Request, again: bool
    ) -> list[tuple[int, GenerateOutput]]:
        """The pack's outputs; one the server aborted fails its input, or with another replica up (the
        aborting one cooled down) is sent there once: none of its text was handed over."""
        results: dict[int, GenerateOutput] = {}
        elsewhere: list[tuple[int, Any]] = []
        for (index, payload), output in zip(pack, outputs, strict=True):
            error = self._aborted(output)
            if error is None:
                results[index] = output
            elif not again and self._elsewhere():
                elsewhere.append((index, payload))
            else:
                results[index] = _failed(index, request, error)
        if elsewhere:
            results.update(await self._send_pack(elsewhere, request, again=True))
        return [(index, results[index]) for index, _ in pack]

    def _aborted(self, output: GenerateOutput) -> ServerError | None:
        """The error of an output the server aborted (finish reason ``"abort"``: shutting down or paused)."""
        reasons = output["finish_reasons"]
        if "abort" not in reasons:
            return None
        tokens = output["statistics"]["output_tokens"][reasons.index("abort")]
        server = output.get("server")
        error = aborted(server or self.base_url, output["request_id"], tokens)
        for replica in self.replicas.replicas:  # several replicas: one shutting down cools down, as when it drops
            if replica.base_url == server:
                self.replicas.failed(replica, error)
        return error

    def _elsewhere(self) -> bool:
        """Several replicas and one of them up."""
        return not self.replicas.single and any(replica.down_since is None for replica in self.replicas.replicas)

    async def _checked(self, sent: list[tuple[int, Any, GenerateOutput]], request: Request) -> None:
        """Check each output against ``structured_outputs`` and ask again for the invalid generations.

        Up to ``structured_outputs_retries`` times, only the invalid generations of inputs that did not fail
        are re-asked (``Request.again``: ``n`` of them, new seeds), as packs through ``_send_pack``, so
        capacity and isolation hold. A re-ask that fails leaves the input's generations as they were, with
        the failure noted in ``validation_errors``; it is not re-sent (the SDK already retried it).
        """
        spec = request.structured
        assert spec is not None
        for _, _, output in sent:
            spec.annotate(output)
        pending = sent
        for attempt in range(1, request.structured_retries + 1):
            by_count: dict[int, list[tuple[int, Any, GenerateOutput, list[int]]]] = {}
            for index, payload, output in pending:
                slots = invalid_slots(output)
                if slots:
                    by_count.setdefault(len(slots), []).append((index, payload, output, slots))
            if not by_count:
                return
            rounds = [self._ask_again(items, request.again(n, attempt)) for n, items in by_count.items()]
            pending = [item for done in await asyncio.gather(*rounds) for item in done]

    async def _ask_again(
        self, items: list[tuple[int, Any, GenerateOutput, list[int]]], request: Request
    ) -> list[tuple[int, Any, GenerateOutput]]:
        """One re-ask of these inputs' invalid generations; returns the inputs whose answers came back."""
        results = await self._send_pack([(index, payload) for index, payload, _, _ in items], request)
        answered = []
        for (index, payload, output, slots), (_, again) in zip(items, results, strict=True):
            if "error" in again:
                failure = again["error"]
                errors = output["validation_errors"]
                for slot in slots:
                    errors[slot] = f"{errors[slot]}; asking again failed ({failure.type}: {failure.message})"
                continue
            assert request.structured is not None
            request.structured.annotate(again)
            replace_generations(output, slots, again)
            answered.append((index, payload, output))
        return answered


def _note_reachability(results: list[tuple[int, GenerateOutput]], unreachable: list[ServerUnreachableError]) -> None:
    for _, output in results:
        error = output.get("error")
        if error is None:
            unreachable.clear()
            return
        if isinstance(error.exception, ServerUnreachableError) and not unreachable:
            unreachable.append(error.exception)


def _not_sent(cause: ServerUnreachableError) -> ServerUnreachableError:
    error = ServerUnreachableError(
        f"Not sent: an earlier request of this call could not reach the server, even after the SDK's retries "
        f"({cause.message}). Start the server and run the call again; with checkpoint=... only the inputs that "
        "are missing are sent."
    )
    error.__cause__ = cause
    return error


def _sharing(pack: list[tuple[int, Any]], request: Request) -> list[list[tuple[int, Any]]]:
    """The pack cut into the groups that may share a request.

    Completions: vLLM's ``prompt`` is all text or all token ids. Chat: a conversation with a content part other
    than text goes alone, because vLLM's ``/chat/completions/batch`` (0.32) answers one whose part it cannot
    validate as if that message were empty, where ``/chat/completions`` refuses it (measured).
    """
    if not request.chat:
        texts = [item for item in pack if type(item[1]) is str]
        ids = [item for item in pack if type(item[1]) is not str]
        return [group for group in (texts, ids) if group]
    together: list[tuple[int, Any]] = []
    groups = [together]
    for item in pack:
        if _text_only(item[1]):
            together.append(item)
        else:
            groups.append([item])
    return [group for group in groups if group]


def _text_only(conversation: Any) -> bool:
    """Whether every message's content is a str (or None) or text parts only."""
    for message in conversation:
        content = message.get("content")
        if type(content) is not str and content is not None and any(part.get("type") != "text" for part in content):
            return False
    return True


def _about_a_prompt(exc: APIError) -> bool:
    if isinstance(exc, PromptTooLongError):  # whatever parameter vLLM blames (input_tokens, max_tokens, ...)
        return True
    if not isinstance(exc, BadRequestError):
        return False
    param = exc.body.get("param") if isinstance(exc.body, dict) else None
    # "body.messages.3": a request-validation error about one conversation of a batch
    return param is None or param in _INPUT_PARAMS or str(param).startswith("body.messages")


def _no_route(exc: APIError) -> bool:
    """A 404/405 that is not vLLM's error object (as for a model it does not serve): the path is not served."""
    return exc.status_code in (404, 405) and not (isinstance(exc.body, dict) and "type" in exc.body)


def as_input_error(index: int, exc: Exception) -> VLLMClientError:
    if isinstance(exc, VLLMClientError):
        return exc
    error = InvalidInputError(f"input {index} could not be prepared for sending ({exc.__class__.__name__}: {exc}).")
    error.__cause__ = exc
    return error


def _failed(index: int, request: Request, exc: BaseException) -> GenerateOutput:
    if not isinstance(exc, VLLMClientError):  # nothing was answered: ours, never worded as the server's
        error = VLLMClientError(
            f"input {index}: the request could not be sent ({exc.__class__.__name__}: {exc}); nothing reached the "
            "server. This is a vllmclient bug or an input it should have refused: please report it."
        )
        error.__cause__ = exc
        exc = error
    output = failed_output(request.n, GenerationError.from_exception(index, exc))
    if request.structured is not None:
        request.structured.annotate(output)
    return output
