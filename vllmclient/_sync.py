"""One private event loop in a daemon thread per client.

All network work runs on this loop, whoever calls: a plain script, a Jupyter cell (whose loop is
already running), or a coroutine in any other loop. So the SDK client is bound to exactly one loop
for its whole life (reusing it across loops fails with "Event loop is closed"), and no global
patching of asyncio is needed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from .errors import VLLMClientError

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "vllmclient") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closers: list[Callable[[], Coroutine[Any, Any, Any]]] = []

    def add_closer(self, closer: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Have ``stop()`` await ``closer()`` on the loop first (e.g. an HTTP client's ``close``)."""
        self._closers.append(closer)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = threading.Thread(target=self._serve, args=(loop, ready), name=self._name, daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def in_loop(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run to completion from synchronous code; Ctrl-C cancels the work on the loop, then re-raises.

        The interrupted caller waits (briefly) until the cancelled work has really finished, so no
        request outlives the call and the next call starts clean.
        """
        if self.in_loop():
            coro.close()
            raise RuntimeError("a synchronous vllmclient call was made from a callback on its own loop; await it")
        loop = self.loop
        outcome: concurrent.futures.Future[T] = concurrent.futures.Future()
        finished = threading.Event()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro)
            tasks.append(task)
            task.add_done_callback(lambda done: _settle(done, outcome, finished))

        loop.call_soon_threadsafe(start)
        try:
            return outcome.result()
        except concurrent.futures.CancelledError:
            raise _closed_meanwhile() from None
        except BaseException:
            loop.call_soon_threadsafe(lambda: tasks[0].cancel())  # runs after start(): callbacks are FIFO
            finished.wait(timeout=10)
            raise

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await from any event loop; cancelling the caller cancels the work."""
        if self.in_loop():
            return await coro
        try:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if caller is not None and not caller.cancelling():  # not the caller's own cancellation
                raise _closed_meanwhile() from None
            raise

    async def aiter(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """Iterate from any event loop an async iterator that runs on this one.

        A small queue between the two loops passes items (and a raised exception) across, and keeps
        backpressure: the stream advances only as fast as the caller consumes.
        """
        if self.in_loop():
            async for item in stream:
                yield item
            return
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
        end = object()

        async def put(item: Any) -> None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(queue.put(item), caller))

        async def pump() -> None:
            try:
                async for item in stream:
                    await put(item)
            except Exception as exc:
                await put(exc)
                raise
            else:
                await put(end)

        pumping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(pump(), self.loop))
        try:
            while True:
                if queue.empty():
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait((getter, pumping), return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():  # the pump ended: its last item is queued, or the client was closed
                        getter.cancel()
                        if queue.empty():
                            raise _closed_meanwhile()
                        continue
                    item = getter.result()
                else:
                    item = queue.get_nowait()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            pumping.cancel()
            if pumping.done() and not pumping.cancelled():
                pumping.exception()  # already raised here from the queue

    def iterate(self, stream: AsyncGenerator[T, None]) -> Iterator[T]:
        """Iterate from synchronous code (a script, a notebook cell) an async generator that runs on this loop.

        Each item is one ``run()``, so Ctrl-C works as for any call; leaving the loop early (``break``, an
        exception, the iterator dropped or closed) closes the generator on the loop at once.
        """
        loop = None
        try:
            while True:
                if loop is not None and self._loop is not loop:
                    raise _closed_meanwhile()
                item = self.run(_anext(stream))
                loop = self._loop
                if item is _END:
                    return
                yield item
        finally:
            if loop is not None and self._loop is loop:  # else stop() closed the connections it held
                self.run(stream.aclose())

    def stop(self) -> None:
        """Close what was registered, then end the thread; safe to call twice, and at interpreter exit."""
        with self._lock:
            loop, thread, closers = self._loop, self._thread, self._closers
            self._loop = self._thread = None
            self._closers = []
        if loop is None or thread is None or not thread.is_alive():
            return
        if threading.current_thread() is thread:
            loop.call_soon(loop.stop)
            return
        done = asyncio.run_coroutine_threadsafe(_shutdown(closers), loop)
        concurrent.futures.wait([done], timeout=15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


_END: Any = object()


async def _anext(stream: AsyncGenerator[T, None]) -> T:
    """The next item, or ``_END`` at the end (``run()`` takes a coroutine; ``__anext__()`` is not one)."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END  # type: ignore[no-any-return]


def _settle(task: asyncio.Task[T], outcome: concurrent.futures.Future[T], finished: threading.Event) -> None:
    if task.cancelled():
        outcome.cancel()
    elif (exc := task.exception()) is not None:
        outcome.set_exception(exc)
    else:
        outcome.set_result(task.result())
    finished.set()


async def _shutdown(closers: list[Callable[[], Coroutine[Any, Any, Any]]]) -> None:
    """Cancel the calls still running (their callers get an error, not a hang), then close."""
    running = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in running:
        task.cancel()
    await asyncio.wait(running, timeout=10) if running else None
    await asyncio.gather(*(closer() for closer in closers), return_exceptions=True)


def _closed_meanwhile() -> VLLMClientError:
    return VLLMClientError(
        "the client was closed (close(), or a connection setting changed) while this call was running; "
        "call again to reconnect"
    )
