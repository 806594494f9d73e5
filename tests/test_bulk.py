"""Bulk generation over real HTTP: bounded concurrency, packing and splitting, per-input isolation,
ordering, strict mode, the async iterator, progress bars, cancellation and input types.

Every claim is checked on what the fake server saw (recorded request bodies, in-flight high-water
marks, answered requests) or on the outputs, never on the client's internals.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vllmclient import APIError, ClientvLLM, GenerationFailedError, InvalidInputError

from deadline import run_with_timeout

Conversation = list[dict[str, str]]

BAD_ROLE: Conversation = [{"role": "robot", "content": "BADROLE beep"}]
POISON_MESSAGE = "The prompt contains a forbidden word."


def user(text: str) -> Conversation:
    return [{"role": "user", "content": text}]


def tagged(count: int, start: int = 0) -> list[Conversation]:
    """Inputs whose generations begin with ``q<index>`` (the fake honours ``[[TAG]]``)."""
    return [user(f"[[q{i}]] tell me something") for i in range(start, start + count)]


def starts_with_tag(output: dict[str, Any], index: int) -> bool:
    return all(text is not None and text.split()[0] == f"q{index}" for text in output["generations"])


def client(server: Any, tokenizer_dir: Any, **kwargs: Any) -> ClientvLLM:
    kwargs.setdefault("tokenizer", tokenizer_dir)
    return ClientvLLM(base_url=server.base_url, max_retries=0, **kwargs)


def packs(server: Any) -> list[list[str]]:
    """The prompt list of every /v1/completions request, in arrival order."""
    return [request.body["prompt"] for request in server.requests_to("/v1/completions")]


def sent_prompts(server: Any) -> list[str]:
    return [prompt for pack in packs(server) for prompt in pack]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


async def await_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


@pytest.fixture
def llm(fake_vllm, tokenizer_dir) -> Iterator[ClientvLLM]:
    with client(fake_vllm, tokenizer_dir) as instance:
        yield instance


# -- the concurrency limit is a ceiling, and it is used --------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "max_concurrency", "pack_size", "num_generations", "count"),
    [
        ("/v1/completions", 8, None, 1, 80),
        ("/v1/completions", 8, 1, 1, 80),
        ("/v1/completions", 12, None, 3, 40),
        ("/v1/completions", 12, 1, 3, 40),
        ("/v1/completions", 13, None, 1, 130),  # packs of 3 and 2 tile 13 slots exactly
        ("/v1/chat/completions/batch", 8, None, 1, 40),  # tokenizer=None: the server applies the template
        ("/v1/chat/completions", 8, 1, 1, 40),
    ],
    ids=["packed", "pack_size=1", "n=3-packed", "n=3-pack_size=1", "13-slots", "chat-packed", "chat-pack_size=1"],
)
def test_sequences_in_flight_never_exceed_max_concurrency_and_reach_it(
    fake_vllm, tokenizer_dir, endpoint, max_concurrency, pack_size, num_generations, count
):
    fake_vllm.latency = 0.05
    tokenizer = tokenizer_dir if endpoint == "/v1/completions" else None
    with client(fake_vllm, tokenizer, max_concurrency=max_concurrency, pack_size=pack_size) as llm:
        outputs = llm.generate(tagged(count), num_generations=num_generations, max_new_tokens=4, progress=False)
    assert all(starts_with_tag(output, i) for i, output in enumerate(outputs))
    assert fake_vllm.max_in_flight_sequences <= max_concurrency  # sequences = prompts x n
    assert fake_vllm.max_in_flight_sequences == max_concurrency  # and the whole budget is used
    bodies = [r.body for r in fake_vllm.requests_to(endpoint)]
    assert bodies and all(body["n"] == num_generations for body in bodies)


@pytest.mark.asyncio
async def test_many_concurrent_agenerate_calls_share_the_limit(fake_vllm, tokenizer_dir):
    """distilabel's pattern: one ``agenerate`` per input, all gathered at once."""
    fake_vllm.latency = 0.05
    async with client(fake_vllm, tokenizer_dir, max_concurrency=16) as llm:
        outputs = await asyncio.gather(*(llm.agenerate(conversation, max_new_tokens=4) for conversation in tagged(160)))
    assert all(starts_with_tag(output, i) for i, output in enumerate(outputs))
    assert fake_vllm.max_in_flight_sequences <= 16
    assert fake_vllm.max_in_flight_sequences == 16
    assert len(fake_vllm.requests_to("/v1/completions")) == 160


@pytest.mark.asyncio
async def test_a_request_waiting_to_retry_holds_no_slots(fake_vllm, tokenizer_dir):
    """Slots count what the server is working on: during the SDK's back-off another request goes first."""
    fake_vllm.fail_next(503, headers={"retry-after": "0.5"})
    async with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, max_concurrency=1, max_retries=1) as llm:
        first = asyncio.create_task(llm.agenerate(user("[[a]] x"), max_new_tokens=4))
        assert await await_until(lambda: len(packs(fake_vllm)) == 1 and fake_vllm.in_flight_requests == 0)
        second = await llm.agenerate(user("[[b]] x"), max_new_tokens=4)
        assert second["generations"][0].split()[0] == "b"
        assert (await first)["generations"][0].split()[0] == "a"
    tags = [prompt.split("[[")[1][0] for pack in packs(fake_vllm) for prompt in pack]
    assert tags == ["a", "b", "a"]  # a (503), b during a's back-off, a's retry
    assert fake_vllm.max_in_flight_sequences == 1


@pytest.mark.asyncio
async def test_a_cancelled_waiter_does_not_block_those_queued_behind_it():
    from vllmclient._http import Capacity

    capacity = Capacity(4)
    await capacity.acquire(3)
    big = asyncio.create_task(capacity.acquire(4))  # e.g. a pack of an abandoned stream
    small = asyncio.create_task(capacity.acquire(1))  # e.g. an agenerate queued behind it
    await asyncio.sleep(0)
    big.cancel()
    assert await asyncio.wait_for(small, 1) == 1  # the free slot goes to it without waiting for a release
    assert capacity.used == 4


@pytest.mark.asyncio
async def test_waiting_for_a_slot_does_not_count_against_the_timeout(fake_vllm, tokenizer_dir):
    """``timeout`` is about the server's time on a request, not its place in the client's queue."""
    fake_vllm.latency = 0.3
    async with client(fake_vllm, tokenizer_dir, max_concurrency=1, timeout=0.5) as llm:
        outputs = await asyncio.gather(*(llm.agenerate(conversation, max_new_tokens=4) for conversation in tagged(4)))
    assert all(starts_with_tag(output, i) for i, output in enumerate(outputs))  # the last waited ~0.9 s
    assert fake_vllm.max_in_flight_sequences == 1


@pytest.mark.asyncio
async def test_a_slow_response_hook_of_the_users_does_not_hold_the_slot(fake_vllm, tokenizer_dir):
    fake_vllm.latency = 0.05
    sent_while_first_hook_ran: list[int] = []

    async def slow(response: Any) -> None:
        if response.request.url.path.endswith("/completions") and not sent_while_first_hook_ran:
            sent_while_first_hook_ran.append(0)
            await asyncio.sleep(0.3)
            sent_while_first_hook_ran[0] = len(packs(fake_vllm))

    hooks = {"response": [slow]}
    async with client(fake_vllm, tokenizer_dir, max_concurrency=1, httpx_client_kwargs={"event_hooks": hooks}) as llm:
        await asyncio.gather(*(llm.agenerate(conversation, max_new_tokens=4) for conversation in tagged(2)))
    assert sent_while_first_hook_ran == [2]  # the slot was given back before the user's hook ran


def test_the_users_event_hooks_run_beside_the_clients_own(fake_vllm, tokenizer_dir):
    fake_vllm.latency = 0.05
    seen: list[str] = []

    async def hook(request: Any) -> None:
        seen.append(request.url.path)

    hooks = {"request": [hook]}
    with client(fake_vllm, tokenizer_dir, max_concurrency=4, httpx_client_kwargs={"event_hooks": hooks}) as llm:
        outputs = llm.generate(tagged(20), max_new_tokens=4, progress=False)
    assert all(starts_with_tag(output, i) for i, output in enumerate(outputs))
    assert seen.count("/v1/completions") == len(packs(fake_vllm)) > 1
    assert fake_vllm.max_in_flight_sequences == 4
    assert hooks == {"request": [hook]}  # the caller's dict is left as it was


@pytest.mark.asyncio
async def test_a_waiter_cancelled_before_its_turn_takes_no_capacity():
    """The race behind abandoning a stream: a queued pack is cancelled just as the slots it waits for free up."""
    from vllmclient._http import Capacity

    capacity = Capacity(4)
    await capacity.acquire(4)
    first = asyncio.create_task(capacity.acquire(4))
    second = asyncio.create_task(capacity.acquire(2))
    await asyncio.sleep(0)
    first.cancel()  # its future is cancelled while it is still first in the queue
    capacity.release(4)
    assert await second == 2
    with pytest.raises(asyncio.CancelledError):
        await first
    assert capacity.used == 2
    capacity.release(2)
    assert await asyncio.wait_for(capacity.acquire(4), 1) == 4


# -- results come back in input order ------------------------------------------------------------


@pytest.mark.parametrize(("pack_size", "count"), [(None, 500), (1, 300)], ids=["packed", "unpacked"])
def test_generate_returns_results_in_input_order(fake_vllm, tokenizer_dir, pack_size, count):
    with client(fake_vllm, tokenizer_dir, pack_size=pack_size) as llm:
        outputs = llm.generate(tagged(count), max_new_tokens=4, progress=False)
        texts = llm.generate_outputs(tagged(7), num_generations=2, max_new_tokens=4)
    assert len(outputs) == count
    assert [output["generations"][0].split()[0] for output in outputs] == [f"q{i}" for i in range(count)]
    assert isinstance(texts, list) and len(texts) == 7
    assert all(isinstance(per_input, list) and len(per_input) == 2 for per_input in texts)
    assert all(isinstance(text, str) and text.split()[0] == f"q{i}" for i, pair in enumerate(texts) for text in pair)


# -- packing ---------------------------------------------------------------------------------------


def test_default_settings_pack_several_prompts_per_request(llm, fake_vllm):
    from vllmclient._engine import PACK_CAP

    outputs = llm.generate(tagged(200), max_new_tokens=4, progress=False)
    assert all(starts_with_tag(output, i) for i, output in enumerate(outputs))
    sizes = [len(pack) for pack in packs(fake_vllm)]
    assert sum(sizes) == 200
    assert len(sizes) < 200 // 4  # far fewer requests than prompts
    assert max(sizes) > 1
    assert max(sizes) <= PACK_CAP


def test_pack_size_1_sends_one_prompt_per_request(fake_vllm, tokenizer_dir):
    with client(fake_vllm, tokenizer_dir, pack_size=1) as llm:
        llm.generate(tagged(30), max_new_tokens=4)
    assert [len(pack) for pack in packs(fake_vllm)] == [1] * 30


def test_pack_size_8_sends_packs_of_at_most_8(fake_vllm, tokenizer_dir):
    with client(fake_vllm, tokenizer_dir, pack_size=8) as llm:
        llm.generate(tagged(50), max_new_tokens=4)
    sizes = [len(pack) for pack in packs(fake_vllm)]
    assert sum(sizes) == 50
    assert max(sizes) == 8
    assert len(sizes) <= 10  # 50 prompts in packs of 8: 7 requests when the last is partial, a few more at most


def test_packing_does_not_change_the_texts_for_a_fixed_seed(fake_vllm, tokenizer_dir):
    inputs = [user(f"question {i}") for i in range(40)]
    with client(fake_vllm, tokenizer_dir) as llm:
        packed = llm.generate_outputs(inputs, num_generations=2, max_new_tokens=12, seed=11)
    with client(fake_vllm, tokenizer_dir, pack_size=1) as llm:
        unpacked = llm.generate_outputs(inputs, num_generations=2, max_new_tokens=12, seed=11)
    assert max(len(pack) for pack in packs(fake_vllm)) > 1  # the first run did pack
    assert packed == unpacked
    assert len({pair[0] for pair in packed}) > 1  # and the texts are not all the same


# -- a 400 about one prompt splits its pack; a 400 about a parameter does not ----------------------


def test_a_bad_prompt_in_a_pack_fails_alone_after_bisection(fake_vllm, tokenizer_dir):
    fake_vllm.fail_prompts_containing("POISON", message=POISON_MESSAGE)
    inputs = tagged(16)
    inputs[5] = user("POISON here")
    with client(fake_vllm, tokenizer_dir, pack_size=16) as llm:
        outputs = llm.generate(inputs, num_generations=2, max_new_tokens=4)

    failed = outputs[5]
    assert failed["generations"] == [None, None]
    assert failed["finish_reasons"] == [None, None]
    error = failed["error"]
    assert error.index == 5 and error.status_code == 400 and error.type == "BadRequestError"
    assert POISON_MESSAGE in error.message
    for i, output in enumerate(outputs):
        if i != 5:
            assert "error" not in output and starts_with_tag(output, i)

    sent = packs(fake_vllm)
    poisoned = [pack for pack in sent if any("POISON" in prompt for prompt in pack)]
    assert [len(pack) for pack in poisoned] == [16, 8, 4, 2, 1]  # halved until the guilty prompt is alone
    clean = [prompt for pack in sent if pack not in poisoned for prompt in pack]
    assert len(clean) == 15 and len(set(clean)) == 15  # every other prompt answered exactly once


def test_a_server_side_context_error_fails_only_that_input(fake_vllm, tokenizer_dir):
    fake_vllm.fail_prompts_containing("TOOLONG")  # vLLM's context-length message, param input_tokens
    inputs = tagged(8)
    inputs[2] = user("TOOLONG text")
    with client(fake_vllm, tokenizer_dir, pack_size=8) as llm:
        outputs = llm.generate(inputs, max_new_tokens=4)
    error = outputs[2]["error"]
    assert error.type == "PromptTooLongError" and error.status_code == 400
    assert "maximum context length is 1024" in error.message
    assert all(starts_with_tag(output, i) for i, output in enumerate(outputs) if i != 2)


def test_a_400_about_a_sampling_parameter_fails_the_whole_pack_without_splitting(fake_vllm, tokenizer_dir):
    message = "temperature must be in [0, 2], got 3.0."
    with client(fake_vllm, tokenizer_dir, pack_size=8) as llm:
        fake_vllm.fail_next(
            400, body={"error": {"message": message, "type": "BadRequestError", "param": "temperature", "code": 400}}
        )
        outputs = llm.generate(tagged(8), max_new_tokens=4)
    assert len(fake_vllm.requests_to("/v1/completions")) == 1  # no bisection: it would fail every half alike
    assert [output["error"].index for output in outputs] == list(range(8))
    for output in outputs:
        assert output["generations"] == [None]
        assert output["error"].status_code == 400 and message in output["error"].message


# -- per-input isolation -------------------------------------------------------------------------


def test_invalid_and_too_long_inputs_fail_locally_and_are_not_sent(make_fake_vllm, tokenizer_dir):
    server = make_fake_vllm(models=[{"id": "m", "max_model_len": 64}])
    inputs = [
        user("[[q0]] a"),
        BAD_ROLE,
        user("[[q2]] b"),
        user("LONGTEXT " + "word " * 100),
        user("[[q4]] c"),
    ]
    with client(server, tokenizer_dir) as llm:
        outputs = llm.generate(inputs, max_new_tokens=8)

    assert [i for i, output in enumerate(outputs) if "error" not in output] == [0, 2, 4]
    assert all(starts_with_tag(outputs[i], i) for i in (0, 2, 4))

    invalid = outputs[1]["error"]
    assert invalid.type == "InvalidInputError" and invalid.index == 1
    assert "input 1" in invalid.message and "robot" in invalid.message
    assert outputs[1]["generations"] == [None]

    too_long = outputs[3]["error"]
    assert too_long.type == "PromptTooLongError" and too_long.index == 3
    tokens = too_long.exception.prompt_tokens
    assert tokens > 64
    assert "input 3" in too_long.message and str(tokens) in too_long.message and "64" in too_long.message

    prompts = sent_prompts(server)
    assert len(prompts) == 3
    assert not any("BADROLE" in prompt or "LONGTEXT" in prompt for prompt in prompts)


@pytest.mark.parametrize(
    ("inject", "error_type", "status_code"),
    [
        (lambda server: server.fail_next(500), "ServerError", 500),
        (lambda server: server.drop_next(), "ConnectionLostError", None),
    ],
    ids=["500", "dropped-connection"],
)
def test_a_failed_request_fails_only_the_inputs_of_its_pack(
    fake_vllm, tokenizer_dir, inject, error_type, status_code
):
    with client(fake_vllm, tokenizer_dir, pack_size=4, max_concurrency=4) as llm:
        llm.load()
        inject(fake_vllm)  # the first pack (inputs 0-3) is the only one in flight at first
        outputs = llm.generate(tagged(12), max_new_tokens=4)
    for i, output in enumerate(outputs):
        if i < 4:
            assert output["generations"] == [None]
            assert output["error"].type == error_type and output["error"].status_code == status_code
        else:
            assert "error" not in output and starts_with_tag(output, i)


def test_a_malformed_success_answer_fails_only_its_pack(fake_vllm, tokenizer_dir):
    """A 200 whose body is not a completion (a proxy's HTML page, a truncated answer) is that pack's error."""
    with client(fake_vllm, tokenizer_dir, pack_size=1, max_concurrency=2) as llm:
        llm.load()
        fake_vllm.fail_next(200, body="<html>gateway says hi</html>")
        outputs = run_with_timeout(lambda: llm.generate(tagged(6), max_new_tokens=4))
        assert len(outputs) == 6
        failed = [i for i, output in enumerate(outputs) if "error" in output]
        assert len(failed) == 1
        assert isinstance(outputs[failed[0]]["error"].exception, APIError)
        assert all(starts_with_tag(output, i) for i, output in enumerate(outputs) if i not in failed)
        # nothing leaked: the next call still gets the whole concurrency budget
        fake_vllm.clear()
        fake_vllm.latency = 0.05
        run_with_timeout(lambda: llm.generate(tagged(8), max_new_tokens=4))
        assert fake_vllm.max_in_flight_sequences == 2


# -- strict mode ---------------------------------------------------------------------------------


def test_strict_raises_at_the_end_with_every_failure_and_every_result(llm, fake_vllm):
    fake_vllm.fail_prompts_containing("POISON", message=POISON_MESSAGE)
    inputs = tagged(10)
    inputs[3] = user("POISON")
    inputs[7] = BAD_ROLE
    with pytest.raises(GenerationFailedError) as info:
        llm.generate(inputs, strict=True, max_new_tokens=4)
    failure = info.value
    assert [error.index for error in failure.failures] == [3, 7]
    assert failure.total == 10
    text = str(failure)
    assert "2 of 10 inputs failed" in text
    assert "input 3: BadRequestError" in text and POISON_MESSAGE in text
    assert "input 7: InvalidInputError" in text
    assert len(failure.results) == 10
    assert failure.results[3]["error"] is failure.failures[0]
    assert all(starts_with_tag(failure.results[i], i) for i in range(10) if i not in (3, 7))
    # the other inputs were all generated before raising
    answered = [prompt for pack in packs(fake_vllm) if not any("POISON" in p for p in pack) for prompt in pack]
    assert len(answered) == 8

    with pytest.raises(GenerationFailedError):
        llm.generate_outputs(inputs, strict=True, max_new_tokens=4)
    assert len(llm.generate(tagged(3), strict=True, max_new_tokens=4)) == 3  # no failure: no exception


# -- the async iterator --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_aiter_generate_yields_every_input_once_with_its_index(fake_vllm, tokenizer_dir):
    fake_vllm.latency = 0.02
    async with client(fake_vllm, tokenizer_dir, max_concurrency=8) as llm:
        items = [item async for item in llm.aiter_generate(tagged(60), max_new_tokens=4)]
    assert sorted(index for index, _ in items) == list(range(60))  # each exactly once, in any order
    assert all(starts_with_tag(output, index) for index, output in items)


@pytest.mark.asyncio
async def test_aiter_generate_yields_errors_instead_of_raising(fake_vllm, tokenizer_dir):
    fake_vllm.fail_prompts_containing("POISON", message=POISON_MESSAGE)
    inputs = [user("[[q0]] a"), BAD_ROLE, user("POISON"), user("[[q3]] b")]
    async with client(fake_vllm, tokenizer_dir) as llm:
        items = dict([item async for item in llm.aiter_generate(inputs, max_new_tokens=4)])
    assert sorted(items) == [0, 1, 2, 3]
    assert items[1]["error"].type == "InvalidInputError"
    assert items[2]["error"].type == "BadRequestError" and items[2]["generations"] == [None]
    assert starts_with_tag(items[0], 0) and starts_with_tag(items[3], 3)


class CountingInputs:
    """A generator of inputs that counts how many were pulled."""

    def __init__(self, inputs: list[Conversation]) -> None:
        self.inputs = inputs
        self.pulled = 0

    def __iter__(self) -> Iterator[Conversation]:
        for conversation in self.inputs:
            self.pulled += 1
            yield conversation


@pytest.mark.asyncio
async def test_aiter_generate_reads_a_generator_lazily_for_a_slow_consumer(fake_vllm, tokenizer_dir):
    fake_vllm.latency = 0.005
    source = CountingInputs(tagged(400))
    ahead: list[int] = []
    async with client(fake_vllm, tokenizer_dir, max_concurrency=4) as llm:
        consumed = 0
        async for _index, _output in llm.aiter_generate(iter(source), max_new_tokens=4):
            consumed += 1
            ahead.append(source.pulled - consumed)
            await asyncio.sleep(0.005)  # a slow consumer
            if consumed == 60:
                break
    assert max(ahead) <= 3 * 4 + 1  # pulled ahead of the consumer: bounded by the concurrency, not the input
    assert source.pulled < 100


@pytest.mark.asyncio
async def test_aiter_generate_reads_a_run_of_invalid_inputs_lazily_too(fake_vllm, tokenizer_dir):
    """Invalid inputs are results too: a long run of them must not be read all at once."""
    source = CountingInputs([BAD_ROLE] * 300 + tagged(20))
    async with client(fake_vllm, tokenizer_dir, max_concurrency=4) as llm:
        async for _index, output in llm.aiter_generate(iter(source), max_new_tokens=4):
            assert output["error"].type == "InvalidInputError"
            pulled_at_first_result = source.pulled
            break
    assert pulled_at_first_result <= 3 * 4 + 1


@pytest.mark.asyncio
async def test_breaking_out_of_aiter_generate_abandons_the_rest(fake_vllm, tokenizer_dir):
    fake_vllm.latency = 0.2
    # one pack of 4 fills the budget: while the consumer reads the first pack, the second is in flight
    async with client(fake_vllm, tokenizer_dir, max_concurrency=4, pack_size=4) as llm:
        async for _ in llm.aiter_generate(tagged(100), max_new_tokens=4):
            break
        await asyncio.sleep(0.35)  # past the latency: a request still running would have been answered
        sent = len(fake_vllm.requests_to("/v1/completions"))
        assert fake_vllm.completion_requests == 1  # the first pack only; the one in flight was abandoned
        assert sent <= 2
        await asyncio.sleep(0.25)
        assert len(fake_vllm.requests_to("/v1/completions")) == sent  # and nothing more is sent
        # the client is still fully usable
        fake_vllm.latency = 0
        items = await asyncio.wait_for(_collect(llm.aiter_generate(tagged(8), max_new_tokens=4)), 3)
        assert sorted(index for index, _ in items) == list(range(8))


async def _collect(iterator: Any) -> list[Any]:
    return [item async for item in iterator]


# -- progress bar --------------------------------------------------------------------------------


def test_progress_true_shows_a_bar_on_stderr(llm, capfd):
    llm.load()
    capfd.readouterr()
    llm.generate(tagged(5), progress=True, max_new_tokens=4)
    captured = capfd.readouterr()
    assert "5/5" in captured.err and "vllmclient" in captured.err
    assert captured.out == ""


def test_progress_bar_counts_errors(llm, capfd):
    llm.load()
    capfd.readouterr()
    llm.generate([*tagged(3), BAD_ROLE], progress=True, max_new_tokens=4)
    err = capfd.readouterr().err
    assert "4/4" in err and "errors=1" in err


@pytest.mark.parametrize(
    ("count", "progress", "shown"),
    [(150, False, False), (150, None, True), (5, None, False)],
    ids=["off", "default-many", "default-few"],
)
def test_progress_default_is_on_for_100_inputs_or_more(llm, capfd, count, progress, shown):
    llm.load()
    capfd.readouterr()
    llm.generate(tagged(count), progress=progress, max_new_tokens=4)
    err = capfd.readouterr().err
    if shown:
        assert f"{count}/{count}" in err
    else:
        assert err == ""


# -- cancellation --------------------------------------------------------------------------------

# The fake answers after ``latency``; a request the client really abandoned is cut off by the
# closed connection and never answered, so ``completion_requests`` stays 0 past the latency.


@pytest.mark.asyncio
async def test_cancelling_agenerate_abandons_its_request(fake_vllm, tokenizer_dir):
    fake_vllm.latency = 0.3
    async with client(fake_vllm, tokenizer_dir, max_concurrency=1) as llm:
        task = asyncio.create_task(llm.agenerate(user("x"), max_new_tokens=4))
        assert await await_until(lambda: fake_vllm.in_flight_requests == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.45)  # past the latency: an uncancelled request would be answered by now
        assert fake_vllm.completion_requests == 0
        fake_vllm.latency = 0
        output = await asyncio.wait_for(llm.agenerate(user("[[again]] x"), max_new_tokens=4), 3)
        assert output["generations"][0].startswith("again")


@pytest.mark.asyncio
async def test_cancelling_a_task_iterating_aiter_generate_stops_its_work(fake_vllm, tokenizer_dir):
    fake_vllm.latency = 0.3
    async with client(fake_vllm, tokenizer_dir, max_concurrency=8) as llm:

        async def consume() -> None:
            async for _ in llm.aiter_generate(tagged(40), max_new_tokens=4):
                pass

        task = asyncio.create_task(consume())
        assert await await_until(lambda: fake_vllm.in_flight_sequences == 8)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        sent = len(fake_vllm.requests_to("/v1/completions"))
        await asyncio.sleep(0.45)
        assert fake_vllm.completion_requests == 0
        assert len(fake_vllm.requests_to("/v1/completions")) == sent  # nothing new was sent
        fake_vllm.latency = 0
        items = await asyncio.wait_for(_collect(llm.aiter_generate(tagged(8), max_new_tokens=4)), 3)
        assert sorted(index for index, _ in items) == list(range(8))


def test_ctrl_c_during_generate_stops_its_requests(fake_vllm, tokenizer_dir):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT is delivered to the main thread only")
    fake_vllm.latency = 0.3
    with client(fake_vllm, tokenizer_dir, max_concurrency=8) as llm:

        def press_ctrl_c() -> None:
            if wait_until(lambda: fake_vllm.in_flight_sequences == 8):
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        presser = threading.Thread(target=press_ctrl_c, daemon=True)
        presser.start()
        with pytest.raises(KeyboardInterrupt):
            llm.generate(tagged(40), max_new_tokens=4)
        presser.join()
        sent = len(fake_vllm.requests_to("/v1/completions"))
        time.sleep(0.45)
        assert fake_vllm.completion_requests == 0
        assert len(fake_vllm.requests_to("/v1/completions")) == sent
        fake_vllm.latency = 0
        outputs = run_with_timeout(lambda: llm.generate(tagged(8), max_new_tokens=4))
        assert all(starts_with_tag(output, i) for i, output in enumerate(outputs))


# -- inputs: any iterable of conversations ---------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda inputs: (conversation for conversation in inputs),
        tuple,
        lambda inputs: map(list, inputs),
        iter,
    ],
    ids=["generator", "tuple", "map", "iterator"],
)
def test_inputs_can_be_any_iterable(llm, make):
    outputs = llm.generate(make(tagged(12)), max_new_tokens=4, progress=False)
    assert len(outputs) == 12
    assert all(starts_with_tag(output, i) for i, output in enumerate(outputs))


@pytest.mark.parametrize(
    ("inputs", "type_name"),
    [({"role": "user", "content": "hi"}, "dict"), ("hello", "str")],
    ids=["dict", "str"],
)
def test_a_dict_or_a_str_as_inputs_is_a_clear_error(llm, fake_vllm, inputs, type_name):
    llm.load()
    with pytest.raises(InvalidInputError, match=rf"inputs must be a list .*got {type_name}"):
        llm.generate(inputs)
    with pytest.raises(InvalidInputError, match=rf"got {type_name}"):
        llm.generate_outputs(inputs)

    async def iterate() -> None:
        async for _ in llm.aiter_generate(inputs):
            pass

    with pytest.raises(InvalidInputError, match=rf"got {type_name}"):
        asyncio.run(iterate())
    assert fake_vllm.requests_to("/v1/completions") == []


@pytest.mark.asyncio
async def test_another_call_from_inside_an_aiter_generate_loop_does_not_deadlock(fake_vllm, tokenizer_dir):
    """Results waiting in the loop hold only that stream's window, not the server slots other calls need."""
    async with client(fake_vllm, tokenizer_dir, max_concurrency=4) as llm:

        async def job() -> list[str]:
            texts = []
            async for index, _ in llm.aiter_generate(tagged(40), max_new_tokens=4):
                if index % 10 == 0:
                    inner = await llm.agenerate(user(f"[[in{index}]] x"), max_new_tokens=4)
                    texts.append(inner["generations"][0].split()[0])
            return texts

        texts = await asyncio.wait_for(job(), 10)
        assert sorted(texts) == sorted(f"in{i}" for i in range(0, 40, 10))
        assert fake_vllm.max_in_flight_sequences <= 4
