"""Streaming: ``stream()``/``astream()`` on both paths, from sync and async code, aborts, mid-stream errors,
the final event, and the capacity a stream holds and gives back."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from transformers import AutoTokenizer

from vllmclient import (
    APIError,
    BadRequestError,
    ClientvLLM,
    ConnectionLostError,
    InvalidInputError,
    ServerError,
    ServerTimeoutError,
    StreamEnd,
    TextDelta,
    VLLMClientError,
)

TEMPLATE, CHAT = "template", "chat"
PATHS = {TEMPLATE: "/v1/completions", CHAT: "/v1/chat/completions"}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def client_for(server: Any, tokenizer_dir: Any, path: str, **kwargs: Any) -> ClientvLLM:
    return ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir if path == TEMPLATE else None,
                      max_retries=0, **kwargs)


@pytest.fixture(params=[TEMPLATE, CHAT])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def llm(fake_vllm, tokenizer_dir, path):
    client = client_for(fake_vllm, tokenizer_dir, path)
    yield client
    client.close()


def split(events: list[Any]) -> tuple[list[TextDelta], StreamEnd]:
    *deltas, end = events
    assert all(isinstance(delta, TextDelta) for delta in deltas)
    assert isinstance(end, StreamEnd)
    return deltas, end


def wait_until(condition: Any, seconds: float = 15.0) -> None:
    """Poll (not a timed assertion: the deadline only keeps a broken test from hanging)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# -- what a stream yields ----------------------------------------------------------------------------


def test_stream_yields_the_text_agenerate_would_and_a_final_event_with_its_facts(llm, fake_vllm, path):
    params = {"max_new_tokens": 20, "seed": 3, "top_k": 5}
    deltas, end = split(list(llm.stream(user("[[s]] tell me"), **params)))
    whole = asyncio.run(llm.agenerate(user("[[s]] tell me"), **params))
    streamed, plain = (r.body for r in fake_vllm.requests_to(PATHS[path])[-2:])
    # the same request (typed parameters, prepared input), asked as a stream with usage at the end
    assert streamed.pop("stream") is True and streamed.pop("stream_options") == {"include_usage": True}
    assert streamed == plain
    assert len(deltas) > 1 and all(delta.text for delta in deltas)
    assert end.text == "".join(delta.text for delta in deltas) == whole["generations"][0]
    assert end.text.startswith("s")
    assert end.finish_reason == whole["finish_reasons"][0]
    assert end.input_tokens == whole["statistics"]["input_tokens"][0]
    assert end.output_tokens == whole["statistics"]["output_tokens"][0]
    header = fake_vllm.requests_to(PATHS[path])[-2].headers["x-request-id"]
    assert end.request_id == header and header.startswith("vllmclient-")
    assert end.time_to_first_token is not None and 0 <= end.time_to_first_token <= end.latency


def test_output_tokens_are_the_servers_count(fake_vllm, tokenizer_dir):
    with client_for(fake_vllm, tokenizer_dir, TEMPLATE) as llm:
        *_, end = llm.stream(user("[[t]] x"), max_new_tokens=9, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert end.output_tokens == len(tokenizer.encode(end.text, add_special_tokens=False))


def test_astream_from_async_code(llm, path):
    async def main() -> list[Any]:
        return [event async for event in llm.astream(user("[[a]] go"), max_new_tokens=12)]

    deltas, end = split(asyncio.run(main()))
    assert end.text.startswith("a") and end.text == "".join(d.text for d in deltas)


def test_sync_stream_inside_a_running_event_loop(llm):
    """A notebook cell: synchronous iteration while the kernel's loop runs; twice, in two loops."""

    async def cell() -> list[Any]:
        asyncio.get_running_loop()
        return list(llm.stream(user("[[nb]] hi"), max_new_tokens=8))

    for _ in range(2):
        _, end = split(asyncio.run(cell()))
        assert end.text.startswith("nb")


def test_streams_and_other_calls_mix_on_one_client(llm):
    async def main() -> tuple[list[Any], list[Any]]:
        async def collect(tag: str) -> list[Any]:
            return [event async for event in llm.astream(user(f"[[{tag}]] go"), max_new_tokens=10)]

        return await asyncio.gather(collect("p"), collect("q"), llm.agenerate(user("[[r]] go")))  # type: ignore[return-value]

    first, second, output = asyncio.run(main())
    assert split(first)[1].text.startswith("p") and split(second)[1].text.startswith("q")
    assert output["generations"][0].startswith("r")
    assert llm.generate_outputs([user("[[z]] after")])[0][0].startswith("z")


def test_client_generation_kwargs_apply_and_a_calls_own_win(fake_vllm, tokenizer_dir, path):
    with client_for(fake_vllm, tokenizer_dir, path, generation_kwargs={"max_new_tokens": 7, "top_k": 3,
                                                                         "num_generations": 4}) as llm:
        list(llm.stream(user("x"), top_k=9))
    body = fake_vllm.requests_to(PATHS[path])[-1].body
    assert (body["max_tokens"], body["top_k"], body["n"]) == (7, 9, 1)


def test_reasoning_and_tool_call_deltas_are_carried(make_fake_vllm):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    server = make_fake_vllm(reasoning_parser=True)
    with ClientvLLM(base_url=server.base_url, tokenizer=None) as llm:
        deltas, end = split(list(llm.stream(user("[[w]] weather?"), tools=tools, tool_choice="auto")))
    assert "".join(d.reasoning or "" for d in deltas) == "thinking about choice 0"
    calls = [call for d in deltas for call in d.tool_calls or ()]
    assert calls[0]["id"] == "chatcmpl-tool-0" and calls[0]["function"]["name"] == "lookup"
    arguments = "".join(call["function"]["arguments"] for call in calls)
    assert json.loads(arguments)["text"].startswith("w")
    assert end.finish_reason == "tool_calls" and end.text == ""
    assert end.time_to_first_token is not None  # a reasoning delta is the first token


def test_logprobs_come_with_each_delta(llm):
    deltas, end = split(list(llm.stream(user("x"), max_new_tokens=10, logprobs=2, seed=1)))
    positions = [position for d in deltas for position in d.logprobs or ()]
    assert len(positions) == end.output_tokens
    assert all(1 <= len(position) <= 3 and "logprob" in position[0] for position in positions)  # top 2 + the chosen


# -- refused before anything is sent ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"num_generations": 2}, "num_generations=2 is invalid for streaming"),
        ({"structured_outputs": {"choice": ["a", "b"]}, "structured_outputs_retries": 1},
         "structured_outputs_retries=1 is invalid for streaming"),
        ({"prompt_logprobs": 1}, "prompt_logprobs is not supported by stream"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_what_a_stream_cannot_do_is_refused_before_sending(llm, fake_vllm, path, params, words):
    with pytest.raises(InvalidInputError, match=words):
        next(llm.stream(user("x"), **params))
    with pytest.raises(InvalidInputError, match=words):
        asyncio.run(anext(llm.astream(user("x"), **params)))
    assert fake_vllm.requests_to(PATHS[path]) == []


def test_a_bad_conversation_is_refused_before_sending(llm, fake_vllm, path):
    with pytest.raises(InvalidInputError, match="input 0"):
        list(llm.stream([{"role": "user"}]))
    assert fake_vllm.requests_to(PATHS[path]) == []


def test_structured_outputs_are_sent_on_a_stream(llm, fake_vllm, path):
    _, end = split(list(llm.stream(user("x"), structured_outputs={"choice": ["yes", "no"]})))
    assert end.text in ("yes", "no")
    assert fake_vllm.requests_to(PATHS[path])[-1].body["structured_outputs"] == {"choice": ["yes", "no"]}


def test_a_structured_stream_ends_with_the_checked_value(llm, path):
    _, end = split(list(llm.stream(user("x"), structured_outputs={"choice": ["yes", "no"]})))
    assert end.parsed == end.text and end.validation_error is None
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    _, whole = split(list(llm.stream(user("x"), structured_outputs=schema, max_new_tokens=256)))
    assert whole.validation_error is None and whole.parsed == json.loads(whole.text)
    _, cut = split(list(llm.stream(user("x"), structured_outputs=schema, max_new_tokens=2)))
    assert cut.finish_reason == "length" and cut.parsed is None and "cut off by max_new_tokens" in cut.validation_error
    _, plain = split(list(llm.stream(user("x"))))
    assert plain.parsed is None and plain.validation_error is None


# -- errors -----------------------------------------------------------------------------------------


def test_an_error_answer_before_the_stream_is_ours(llm, fake_vllm, path):
    fake_vllm.fail_prompts_containing("[[bad]]", status=400, message="no such thing")
    with pytest.raises(BadRequestError, match="no such thing") as caught:
        list(llm.stream(user("[[bad]] x")))
    assert caught.value.status_code == 400 and caught.value.request_id.startswith("vllmclient-")
    assert llm._engine.capacity.used == 0 and llm._engine.connections.used == 0


@pytest.mark.parametrize(
    ("status", "message", "type_", "error"),
    [(500, "Internal server error", "InternalServerError", ServerError),
     (400, "bad token in the middle", "BadRequestError", BadRequestError)],
)
def test_an_error_event_mid_stream_is_ours_after_the_deltas_before_it(
    llm, fake_vllm, path, status, message, type_, error
):
    fake_vllm.fail_next_stream(after_chunks=3, status=status, message=message, type_=type_)
    received: list[Any] = []
    with pytest.raises(error, match=message) as caught:
        received.extend(llm.stream(user("x"), max_new_tokens=40))  # keeps what came before the error
    assert received and all(isinstance(event, TextDelta) for event in received)  # no StreamEnd
    assert caught.value.status_code == status
    assert caught.value.request_id == fake_vllm.requests_to(PATHS[path])[-1].headers["x-request-id"]
    if status == 500:
        assert "middle of the streamed answer" in str(caught.value)
    assert llm._engine.capacity.used == 0 and llm._engine.connections.used == 0

    fake_vllm.fail_next_stream(after_chunks=1, status=status, message=message, type_=type_)

    async def main() -> None:
        async for _ in llm.astream(user("x"), max_new_tokens=40):
            pass

    with pytest.raises(error, match=message):
        asyncio.run(main())


def test_a_generation_the_server_aborted_is_our_error_after_its_deltas(llm, fake_vllm, path):
    """Shutting down, vLLM ends the streams in flight with finish_reason 'abort' (measured on vLLM 0.32): the
    text is incomplete, so no StreamEnd says it ended."""
    fake_vllm.abort_prompts_containing("[[ab]]")
    received: list[Any] = []
    with pytest.raises(ServerError, match="abort") as caught:
        received.extend(llm.stream(user("[[ab]] x"), max_new_tokens=40, ignore_eos=True))
    assert received and all(isinstance(event, TextDelta) for event in received)
    assert caught.value.request_id == fake_vllm.requests_to(PATHS[path])[-1].headers["x-request-id"]
    assert llm._engine.capacity.used == 0 and llm._engine.connections.used == 0
    _, end = split(list(llm.stream(user("[[ok]] x"), max_new_tokens=10)))
    assert end.finish_reason in ("stop", "length")


def test_a_server_silent_mid_stream_is_a_timeout_that_says_the_answer_is_cut(fake_vllm, tokenizer_dir, path):
    """The stream had begun: "did not answer within timeout ... for long generations raise timeout=" misled."""
    fake_vllm.slow_streams(8.0)  # the first chunk at once, then silence past the client's timeout
    # 2 s: room for the connection and first chunk on a loaded machine, which must not time out here
    with client_for(fake_vllm, tokenizer_dir, path, timeout=2.0) as llm:
        with pytest.raises(ServerTimeoutError) as caught:
            list(llm.stream(user("x"), max_new_tokens=50, ignore_eos=True))
        message = str(caught.value)
        for expected in ("in the middle of the streamed answer", "timeout=2", "incomplete", "next piece"):
            assert expected in message, message
        assert "did not answer" not in message and "lower max_new_tokens" not in message
        assert caught.value.request_id == fake_vllm.requests_to(PATHS[path])[-1].headers["x-request-id"]
        assert llm._engine.capacity.used == 0 and llm._engine.connections.used == 0


@pytest.mark.parametrize(
    ("body", "content_type"),
    [({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}, None),
     ("<html><body>Sign in</body></html>", "text/html")],
    ids=["json", "html"],
)
def test_an_answer_that_is_no_stream_is_our_error_not_an_empty_end(llm, fake_vllm, path, body, content_type):
    """A server or proxy that answers 200 without streaming: its answer is not taken for an empty text."""
    fake_vllm.fail_next(200, body=body, content_type=content_type, path=PATHS[path])
    with pytest.raises(APIError, match="not an event stream") as caught:
        list(llm.stream(user("x")))
    assert "application/json" in str(caught.value) or "text/html" in str(caught.value)
    assert caught.value.request_id == fake_vllm.requests_to(PATHS[path])[-1].headers["x-request-id"]
    assert llm._engine.capacity.used == 0 and llm._engine.connections.used == 0


def test_a_stream_ended_before_its_finish_reason_is_a_lost_connection(llm, fake_vllm, path):
    fake_vllm.cut_next_stream(after_chunks=4)
    received: list[Any] = []
    with pytest.raises(ConnectionLostError, match="ended before the answer did") as caught:
        received.extend(llm.stream(user("x"), max_new_tokens=40, ignore_eos=True))
    assert received and all(isinstance(event, TextDelta) for event in received)
    assert "incomplete" in str(caught.value) and caught.value.request_id
    _, end = split(list(llm.stream(user("x"), max_new_tokens=10)))  # the next stream is whole
    assert end.finish_reason in ("stop", "length")


def test_a_server_dying_mid_stream_is_a_lost_connection(fake_vllm, tokenizer_dir, path):
    fake_vllm.slow_streams(0.05)
    with client_for(fake_vllm, tokenizer_dir, path) as llm:
        events = llm.stream(user("x"), max_new_tokens=300, ignore_eos=True)
        assert isinstance(next(events), TextDelta)
        fake_vllm.kill()
        with pytest.raises(APIError) as caught:
            list(events)
        assert isinstance(caught.value, ConnectionLostError), repr(caught.value)
        assert "dropped in the middle of the streamed answer" in str(caught.value)
        assert "every attempt" not in str(caught.value)  # a stream once open is not re-sent
        assert caught.value.request_id == fake_vllm.requests_to(PATHS[path])[-1].headers["x-request-id"]
        assert llm._engine.capacity.used == 0 and llm._engine.connections.used == 0


# -- aborts and capacity --------------------------------------------------------------------------------


def test_breaking_out_aborts_the_request_at_the_server_sync(fake_vllm, tokenizer_dir, path):
    fake_vllm.slow_streams(0.05)
    with client_for(fake_vllm, tokenizer_dir, path, max_concurrency=1) as llm:
        for event in llm.stream(user("x"), max_new_tokens=300, ignore_eos=True):
            assert isinstance(event, TextDelta)
            break
        wait_until(lambda: fake_vllm.streams_aborted == 1 and fake_vllm.in_flight_requests == 0)
        assert fake_vllm.completion_requests == 0  # never answered to the end
        assert llm._engine.capacity.used == 0 and llm._engine.connections.used == 0
        fake_vllm.slow_streams(0)
        assert llm.generate_outputs([user("[[n]] next")])[0][0].startswith("n")  # its slot was given back


def test_breaking_out_aborts_the_request_at_the_server_async(fake_vllm, tokenizer_dir, path):
    fake_vllm.slow_streams(0.05)
    with client_for(fake_vllm, tokenizer_dir, path, max_concurrency=1) as llm:

        async def main() -> None:
            async for event in llm.astream(user("x"), max_new_tokens=300, ignore_eos=True):
                assert isinstance(event, TextDelta)
                break
            await asyncio.to_thread(
                wait_until, lambda: fake_vllm.streams_aborted == 1 and fake_vllm.in_flight_requests == 0
            )
            assert llm._engine.capacity.used == 0
            fake_vllm.slow_streams(0)
            output = await llm.agenerate(user("[[n]] next"))
            assert output["generations"][0].startswith("n")

        asyncio.run(main())
        assert fake_vllm.completion_requests == 1  # the agenerate only


def test_an_async_stream_closed_by_aclosing_aborts_at_once(fake_vllm, tokenizer_dir):
    from contextlib import aclosing

    fake_vllm.slow_streams(0.05)
    with client_for(fake_vllm, tokenizer_dir, TEMPLATE) as llm:

        async def main() -> None:
            async with aclosing(llm.astream(user("x"), max_new_tokens=300, ignore_eos=True)) as events:
                async for _ in events:
                    break
            await asyncio.to_thread(wait_until, lambda: fake_vllm.in_flight_requests == 0)

        asyncio.run(main())
    assert fake_vllm.streams_aborted == 1


def test_a_stream_holds_its_slots_until_it_ends(fake_vllm, tokenizer_dir, path):
    """With max_concurrency=1 another call waits for the stream: the server never has two requests at once."""
    fake_vllm.slow_streams(0.02)
    with client_for(fake_vllm, tokenizer_dir, path, max_concurrency=1) as llm:
        events = llm.stream(user("[[s]] x"), max_new_tokens=60, ignore_eos=True)
        first = next(events)
        assert isinstance(first, TextDelta)
        results: list[Any] = []
        other = threading.Thread(target=lambda: results.append(llm.generate_outputs([user("[[o]] y")])))
        other.start()
        rest = list(events)
        other.join(timeout=30)
        assert isinstance(rest[-1], StreamEnd) and rest[-1].finish_reason == "length"
        assert results[0][0][0].startswith("o")
    assert fake_vllm.max_in_flight_requests == 1


def test_closing_the_client_mid_stream_ends_it_with_our_error(fake_vllm, tokenizer_dir, path):
    fake_vllm.slow_streams(0.05)
    llm = client_for(fake_vllm, tokenizer_dir, path)
    events = llm.stream(user("x"), max_new_tokens=300, ignore_eos=True)
    assert isinstance(next(events), TextDelta)
    llm.close()
    with pytest.raises(VLLMClientError, match="the client was closed"):
        next(events)
    wait_until(lambda: fake_vllm.streams_aborted == 1 and fake_vllm.in_flight_requests == 0)

    async def main() -> None:
        events = llm.astream(user("x"), max_new_tokens=300, ignore_eos=True)
        assert isinstance(await anext(events), TextDelta)
        await llm.aclose()
        with pytest.raises(VLLMClientError, match="the client was closed"):
            await asyncio.wait_for(anext(events), 30)  # a deadline against a hang

    asyncio.run(main())
    wait_until(lambda: fake_vllm.streams_aborted == 2 and fake_vllm.in_flight_requests == 0)
    assert llm.generate_outputs([user("[[again]] y")])[0][0].startswith("again")  # reconnects
    llm.close()
