"""Bulk generation: bounded concurrency, prompt packing with splitting, per-input isolation.

The hot path, run once per prompt, is: prepare (render + checks) → pack → one POST per pack →
unpack the choices. Keep per-prompt work here small and measured (benchmarks/run.py).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx2
import openai

from ._sampling import Request
from .errors import APIError, BadRequestError, VLLMClientError, from_openai
from .results import GenerateOutput, GenerationError, Logprob, empty_output, failed_output

logger = logging.getLogger("vllmclient")

Prepare = Callable[[int, Any], Any]
"""Turns input ``index`` into what is sent (a prompt str, or messages for chat); raises VLLMClientError."""

PACK_CAP = 32
"""Most prompts per request; beyond this the client saves little CPU and packs hold slots longer."""

TARGET_REQUESTS_PER_SECOND = 10.0
"""Adaptive packing aims at about this many HTTP requests per second: each costs the client ~1-2 ms of SDK
CPU and the vLLM API server about as much; measured best on the real server (benchmarks/real_server.py)."""

# 400s whose ``param`` names one of these are about the prompts, so splitting the pack finds the culprit;
# any other named parameter (temperature, logprobs, ...) is wrong for every prompt alike.
_INPUT_PARAMS = frozenset({"input_tokens", "input_text", "prompt", "messages"})


class Capacity:
    """An async counting limiter over sequences (prompts × n) in flight; FIFO, so no caller starves.

    Callers take whole prompts of ``unit`` sequences each: as many as are free, up to ``most``, once at
    least ``least`` are. Waiting for a full pack would leave freed slots idle meanwhile; taking any
    single free slot would split packs into ever smaller fragments.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, int, int, asyncio.Future[int]]] = collections.deque()

    async def acquire(self, most: int, unit: int = 1, least: int = 1) -> int:
        """Wait for room for ``least`` prompts, take up to ``most``; returns the sequences taken."""
        unit = min(unit, self.limit)  # one prompt whose n exceeds the limit runs alone
        need = max(1, min(least, most, self.limit // unit)) * unit
        if not self._waiters and self.used + need <= self.limit:
            return self._take(most, unit)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = (most, unit, need, future)
        self._waiters.append(entry)
        try:
            return await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(future.result())  # granted just as we were cancelled
            elif entry in self._waiters:
                self._waiters.remove(entry)
            raise

    def _take(self, most: int, unit: int) -> int:
        taken = max(1, min(most, (self.limit - self.used) // unit)) * unit
        self.used += taken
        return taken

    def release(self, amount: int) -> None:
        self.used -= amount
        while self._waiters:
            most, unit, need, future = self._waiters[0]
            if self.used + need > self.limit:
                break
            self._waiters.popleft()
            if not future.done():
                future.set_result(self._take(most, unit))


class PackSizer:
    """How many prompts go in the next request.

    Packing cuts the client's CPU per prompt (the SDK costs about 1 ms per HTTP request whatever its
    size), but a pack returns only when its longest generation ends, holding the slots of the others.
    So packs shrink as requests get slow: the target is ~TARGET_REQUESTS_PER_SECOND requests, which
    keeps SDK overhead low, and at least 4 requests in flight so the server never waits on the client.
    """

    def __init__(self, fixed: int | None) -> None:
        self.fixed = fixed
        self.latency: float | None = None  # exponentially weighted mean seconds per request

    def size(self, slots: int) -> int:
        if self.fixed is not None:
            return max(1, min(self.fixed, slots))
        ceiling = max(1, min(PACK_CAP, slots // 4))
        if self.latency is None:
            return ceiling
        wanted = math.ceil(slots / (self.latency * TARGET_REQUESTS_PER_SECOND))
        return max(1, min(ceiling, wanted))

    def bounds(self, size: int) -> tuple[int, int]:
        """The most and the least prompts to wait for: adaptive packs absorb leftover slots (up to
        1.5 × size) and wait for at least half a pack, so packs never crumble into fragments."""
        if self.fixed is not None:
            return size, max(1, size // 2)
        return min(PACK_CAP, size * 3 // 2), max(1, size // 2)

    def observe(self, seconds: float) -> None:
        self.latency = seconds if self.latency is None else 0.8 * self.latency + 0.2 * seconds


class Engine:
    """Sends prepared prompts for one client; lives on the client's private loop."""

    def __init__(
        self,
        aclient: openai.AsyncOpenAI,
        *,
        base_url: str,
        served_models: list[str],
        max_concurrency: int,
        pack_size: int | None,
    ) -> None:
        self.aclient = aclient
        self.base_url = base_url
        self.served_models = served_models
        self.capacity = Capacity(max_concurrency)
        self.sizer = PackSizer(pack_size)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """One request through the SDK (its retries and timeouts), JSON decoded without model parsing."""
        return await self._call(self.aclient.post(path, cast_to=httpx2.Response, body=body))

    async def get(self, path: str) -> Any:
        return await self._call(self.aclient.get(path, cast_to=httpx2.Response))

    async def _call(self, sending: Any) -> Any:
        try:
            response = await sending
        except openai.OpenAIError as exc:
            raise from_openai(exc, base_url=self.base_url, served_models=self.served_models) from exc
        try:
            return json.loads(response.content)
        except ValueError as exc:
            raise APIError(
                f"{self.base_url} answered HTTP {response.status_code} with something that is not JSON "
                f"({response.content[:120]!r}); is base_url the vLLM server itself, not a proxy page?",
                status_code=response.status_code,
                request_id=response.headers.get("x-request-id"),
            ) from exc

    async def one(self, payload: Any, request: Request) -> GenerateOutput:
        """A single input; errors are raised (agenerate's contract)."""
        taken = await self.capacity.acquire(1, request.n)
        try:
            if request.chat:
                data = await self.post("/chat/completions", request.with_messages(payload))
                return _read(_chat_output, data, request)
            data = await self.post("/completions", request.with_prompts([payload]))
            return _read(_completion_outputs, data, 1, request)[0]
        finally:
            self.capacity.release(taken)

    async def stream(
        self, items: Iterable[tuple[int, Any]], request: Request, prepare: Prepare
    ) -> AsyncIterator[list[tuple[int, GenerateOutput]]]:
        """Yield batches of ``(index, output)`` as packs complete; inputs are read only as slots free up.

        Two limits: the client's shared capacity counts what the server is working on (given back as
        soon as it answers, so other calls, even ones made from inside this loop's consumer, go on);
        this stream's window also counts results not yet taken from here, so a slow consumer slows
        the producer and memory stays flat however many inputs there are.
        """
        done: asyncio.Queue[Any] = asyncio.Queue()
        end = object()
        window = Capacity(self.capacity.limit)
        unit = min(request.n, self.capacity.limit)  # what one prompt holds; a huge n runs alone
        holding: dict[asyncio.Task[None], int] = {}  # packs in flight -> what each holds of both limits

        async def send(pack: list[tuple[int, Any]], held: int) -> None:
            start = time.perf_counter()
            try:
                results = await self._send_pack(pack, request)
            except Exception as exc:  # noqa: BLE001 - whatever went wrong fails this pack, never the whole job
                results = [(index, _failed(index, request, exc)) for index, _ in pack]
            if not request.chat:
                self.sizer.observe(time.perf_counter() - start)
            self.capacity.release(held)
            done.put_nowait((results, held))  # from here the consumer releases the window
            holding.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

        async def produce() -> None:
            slots = max(1, self.capacity.limit // unit)
            iterator = iter(items)
            exhausted = False
            while not exhausted:
                size = 1 if request.chat else self.sizer.size(slots)
                most, least = self.sizer.bounds(size)
                room = await window.acquire(most, unit, least) // unit
                shared = await self.capacity.acquire(room, unit, min(least, room))
                window.release((room - shared // unit) * unit)
                room = shared // unit
                pack: list[tuple[int, Any]] = []
                rejected: list[tuple[int, GenerateOutput]] = []
                while len(pack) + len(rejected) < room:  # rejected inputs use room too: reading stays lazy
                    try:
                        index, item = next(iterator)
                    except StopIteration:
                        exhausted = True
                        break
                    try:
                        pack.append((index, prepare(index, item)))
                    except VLLMClientError as exc:
                        rejected.append((index, _failed(index, request, exc)))
                self.capacity.release((room - len(pack)) * unit)  # the server sees only the pack
                window.release((room - len(pack) - len(rejected)) * unit)
                if rejected:
                    done.put_nowait((rejected, len(rejected) * unit))
                if pack:
                    held = len(pack) * unit
                    holding[asyncio.create_task(send(pack, held))] = held
            while holding:
                await asyncio.wait(set(holding))

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
            for task in holding:
                task.cancel()
            await asyncio.gather(producer, *holding, return_exceptions=True)
            for held in holding.values():  # packs abandoned mid-flight (or before they started)
                self.capacity.release(held)
            holding.clear()

    async def _send_pack(self, pack: list[tuple[int, Any]], request: Request) -> list[tuple[int, GenerateOutput]]:
        """Send a pack; on a 400 about its prompts, split it so that only the guilty inputs fail."""
        try:
            if request.chat:
                (index, messages), = pack
                data = await self.post("/chat/completions", request.with_messages(messages))
                return [(index, _read(_chat_output, data, request))]
            data = await self.post("/completions", request.with_prompts([prompt for _, prompt in pack]))
            outputs = _read(_completion_outputs, data, len(pack), request)
        except BadRequestError as exc:
            param = exc.body.get("param") if isinstance(exc.body, dict) else None
            if len(pack) == 1 or (param is not None and param not in _INPUT_PARAMS):
                return [(index, _failed(index, request, exc)) for index, _ in pack]
            middle = len(pack) // 2
            left, right = await asyncio.gather(
                self._send_pack(pack[:middle], request), self._send_pack(pack[middle:], request)
            )
            return left + right
        except APIError as exc:  # includes an answer we cannot read
            return [(index, _failed(index, request, exc)) for index, _ in pack]
        return [(index, outputs[position]) for position, (index, _) in enumerate(pack)]


def _read(parse: Callable[..., Any], data: Any, *args: Any) -> Any:
    """Parse an answer; a shape we cannot read is the server's error, said plainly."""
    try:
        return parse(data, *args)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise APIError(f"unexpected answer from the server ({exc.__class__.__name__}: {exc}): {str(data)[:200]}") from exc


def _failed(index: int, request: Request, exc: BaseException) -> GenerateOutput:
    if not isinstance(exc, VLLMClientError):
        exc = APIError(f"the server's answer could not be read ({exc.__class__.__name__}: {exc})")
    return failed_output(request.n, GenerationError.from_exception(index, exc))


def _completion_outputs(data: dict[str, Any], prompts: int, request: Request) -> list[GenerateOutput]:
    """Choices come prompt-major: ``index = prompt_position * n + j``."""
    n = request.n
    outputs = [empty_output(n) for _ in range(prompts)]
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
            output.setdefault("logprobs", [[] for _ in range(n)])[j] = _completion_logprobs(choice.get("logprobs"))
    for output in outputs:  # prompt_token_ids may be on the first choice of a prompt only
        inputs = output["statistics"]["input_tokens"]
        known = next((count for count in inputs if count is not None), None)
        output["statistics"]["input_tokens"] = [known if count is None else count for count in inputs]
    return outputs


def _chat_output(data: dict[str, Any], request: Request) -> GenerateOutput:
    n = request.n
    output = empty_output(n)
    usage = data.get("usage") or {}
    prompt_ids = data.get("prompt_token_ids")
    input_tokens = len(prompt_ids) if prompt_ids is not None else usage.get("prompt_tokens")
    for choice in data["choices"]:
        j = choice["index"]
        message = choice.get("message") or {}
        output["generations"][j] = message.get("content") or ""
        output["finish_reasons"][j] = choice.get("finish_reason")
        token_ids = choice.get("token_ids")
        output["statistics"]["output_tokens"][j] = (
            len(token_ids) if token_ids is not None else usage.get("completion_tokens") if n == 1 else None
        )
        output["statistics"]["input_tokens"][j] = input_tokens
        if request.logprobs is not None:
            content = (choice.get("logprobs") or {}).get("content") or []
            output.setdefault("logprobs", [[] for _ in range(n)])[j] = [
                [{"token": top["token"], "logprob": top["logprob"]} for top in position.get("top_logprobs") or []]
                or [{"token": position["token"], "logprob": position["logprob"]}]
                for position in content
            ]
    return output


def _completion_logprobs(logprobs: dict[str, Any] | None) -> list[list[Logprob]]:
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
