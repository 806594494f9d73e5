"""Sync calls from scripts, from inside running loops (Jupyter, asyncio.run), repeatedly, mixed with async."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vllmclient import ClientvLLM


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def llm(fake_vllm, tokenizer_dir):
    client = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir)
    yield client
    client.close()


def test_sync_calls_many_times_in_a_row(llm):
    for i in range(5):
        assert llm.generate_outputs([user(f"[[r{i}]] go")])[0][0].startswith(f"r{i}")


def test_sync_call_inside_a_running_loop(llm):
    """What a Jupyter cell does: a synchronous call while the kernel's loop is running."""

    async def cell() -> list[list[str | None]]:
        asyncio.get_running_loop()  # we are inside a running loop
        return llm.generate_outputs([user("[[nb]] hi")])

    assert asyncio.run(cell())[0][0].startswith("nb")
    assert asyncio.run(cell())[0][0].startswith("nb")  # and again, in a second loop


@pytest.mark.asyncio
async def test_sync_call_from_pytest_asyncio_loop(llm):
    assert llm.generate_outputs([user("[[pa]] x")])[0][0].startswith("pa")
    output = await llm.agenerate(user("[[pb]] x"))
    assert output["generations"][0].startswith("pb")


def test_async_calls_in_successive_event_loops(llm):
    """An SDK client reused across loops fails with 'Event loop is closed'; ours must not."""
    for i in range(3):
        output = asyncio.run(llm.agenerate(user(f"[[l{i}]] x")))
        assert output["generations"][0].startswith(f"l{i}")


def test_mixing_sync_and_async_and_threads(llm):
    async def main() -> list[str]:
        texts = [llm.generate_outputs([user("[[s]] x")])[0][0]]
        outputs = await asyncio.gather(*(llm.agenerate(user(f"[[g{i}]] x")) for i in range(20)))
        texts += [o["generations"][0] for o in outputs]
        async for _, output in llm.aiter_generate([user("[[it]] x")], progress=False):
            texts.append(output["generations"][0])
        return texts

    texts = asyncio.run(main())
    assert texts[0].startswith("s") and texts[-1].startswith("it")
    assert [t.split()[0] for t in texts[1:21]] == [f"g{i}" for i in range(20)]

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(llm.generate_outputs([user(f"[[t{i}]] x")])[0][0]))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(t.split()[0] for t in results) == ["t0", "t1", "t2", "t3"]


@pytest.mark.asyncio
async def test_async_context_manager(fake_vllm, tokenizer_dir):
    async with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        output = await llm.agenerate(user("[[ac]] x"))
        assert output["generations"][0].startswith("ac")
    assert llm._aclient is None


def test_no_global_asyncio_patching(llm):
    import sys

    llm.generate_outputs([user("x")])
    assert "nest_asyncio" not in sys.modules
    assert asyncio.run.__module__ == "asyncio.runners"


def test_client_dropped_without_close_cleans_up(tokenizer_dir, tmp_path):
    """No 'Unclosed client session' noise and no leftover thread when a user forgets close()."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "forget.py"
    script.write_text(
        "import gc, sys, threading\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from fake_vllm import FakeVLLM\n"
        "from vllmclient import ClientvLLM\n"
        f"server = FakeVLLM({str(tokenizer_dir)!r}).start()\n"
        "def job():\n"
        f"    llm = ClientvLLM(base_url=server.base_url, tokenizer={str(tokenizer_dir)!r})\n"
        "    return llm.generate_outputs([[{'role': 'user', 'content': 'hi'}]])\n"
        "assert job()[0][0]\n"
        "gc.collect()\n"
        "assert not [t for t in threading.enumerate() if t.name == 'vllmclient'], threading.enumerate()\n"
        "kept = ClientvLLM(base_url=server.base_url, tokenizer=" + repr(str(tokenizer_dir)) + ")\n"
        "assert kept.generate_outputs([[{'role': 'user', 'content': 'hi'}]])[0][0]\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "Unclosed" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_close_while_a_call_runs_ends_that_call_with_a_clear_error(fake_vllm, tokenizer_dir):
    from vllmclient import VLLMClientError

    fake_vllm.latency = 1.0
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, max_retries=3)
    llm.load()
    outcome: list[BaseException | object] = []

    def call() -> None:
        try:
            outcome.append(llm.generate_outputs([user("x")] * 4))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    deadline = time.monotonic() + 5
    while fake_vllm.in_flight_requests == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    llm.close()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the running call hung after close()"
    assert isinstance(outcome[0], VLLMClientError) and "closed" in str(outcome[0])
    fake_vllm.latency = 0
    assert llm.generate_outputs([user("[[again]] x")])[0][0].startswith("again")  # reconnects
    llm.close()


def test_aclose_while_aiter_generate_runs_ends_it_with_a_clear_error(fake_vllm, tokenizer_dir):
    """The async iteration used to wait forever: its pump was cancelled by close() without a word."""
    from vllmclient import VLLMClientError

    fake_vllm.slow_prompts_containing("[[slow]]", 2.0)
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, pack_size=1)

    async def main() -> None:
        results = llm.aiter_generate([user("[[fast]] x"), user("[[slow]] y")], progress=False)
        await anext(results)
        await llm.aclose()
        with pytest.raises(VLLMClientError, match="the client was closed"):
            await asyncio.wait_for(anext(results), 30)  # a deadline against the hang

    asyncio.run(main())
    llm.close()
