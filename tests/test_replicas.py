"""Several servers of one model (``base_url=[...]``): shares of the work, a replica killed mid-job and
restarted, every replica down, a replica serving another model or down at load. Real HTTP to fake servers."""

from __future__ import annotations

import collections
import copy
import json
import logging
import pickle
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from vllmclient import ClientvLLM, StreamEnd
from vllmclient.cli import main
from vllmclient.errors import (
    ConfigurationError,
    ConnectionLostError,
    ModelNotFoundError,
    ServerError,
    ServerUnreachableError,
)

from deadline import run_with_timeout
from fake_vllm import FakeVLLM

_TAG = re.compile(r"\[\[(T\d+)\]\]")


def _inputs(count: int, start: int = 0) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Say [[T{i}]] please"}] for i in range(start, start + count)]


def _tags(server: FakeVLLM) -> list[str]:
    return [tag for prompt in list(server.answered_prompts) for tag in _TAG.findall(prompt)]


def _client(tokenizer_dir: Any, *servers: FakeVLLM | str, **kwargs: Any) -> ClientvLLM:
    settings: dict[str, Any] = {"tokenizer": str(tokenizer_dir), "max_retries": 1, "max_concurrency": 8,
                                "pack_size": 2, "max_new_tokens": 4}
    settings.update(kwargs)
    new_tokens = settings.pop("max_new_tokens")
    urls = [server if isinstance(server, str) else server.base_url for server in servers]
    return ClientvLLM(base_url=urls, generation_kwargs={"max_new_tokens": new_tokens}, **settings)


def _check_each_once(outputs: list[Any], start: int = 0) -> None:
    """Every input has exactly one result, which answers that input (its text begins with the input's tag)."""
    for offset, output in enumerate(outputs):
        assert "error" not in output, output.get("error")
        assert output["generations"][0].startswith(f"T{start + offset}"), (offset, output["generations"])


def _dead_url() -> str:
    """An address where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_both_replicas_get_work_within_their_share(make_fake_vllm: Any, tokenizer_dir: Any) -> None:
    a, b = make_fake_vllm(latency=0.02), make_fake_vllm(latency=0.02)
    with _client(tokenizer_dir, a, b) as llm:
        outputs = llm.generate(_inputs(120))
    _check_each_once(outputs)
    assert sorted(_tags(a) + _tags(b)) == sorted(f"T{i}" for i in range(120))  # none sent twice
    assert len(_tags(a)) >= 30 and len(_tags(b)) >= 30
    assert a.max_in_flight_sequences <= 4 and b.max_in_flight_sequences <= 4  # max_concurrency=8, split
    # each result names the replica that answered it
    assert {f"T{i}" for i, output in enumerate(outputs) if output["server"] == a.base_url + "/v1"} == set(_tags(a))
    assert {f"T{i}" for i, output in enumerate(outputs) if output["server"] == b.base_url + "/v1"} == set(_tags(b))
    with _client(tokenizer_dir, a) as one:  # a list of one is one server: nothing to name
        assert "server" not in one.generate(_inputs(1))[0]


def test_a_killed_replica_loses_nothing_and_rejoins_when_restarted(make_fake_vllm: Any, tokenizer_dir: Any) -> None:
    a, b = make_fake_vllm(latency=0.05), make_fake_vllm(latency=0.05)
    with _client(tokenizer_dir, a, b) as llm:
        killed = threading.Event()

        def kill_when_busy() -> None:
            _wait_for(lambda: a.completion_requests >= 5 and a.in_flight_requests > 0)
            a.kill()  # refuses new connections, resets those open: requests on it are lost mid-answer
            killed.set()

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        outputs = run_with_timeout(lambda: llm.generate(_inputs(200)), timeout=60)
        killer.join()
        assert killed.is_set()
        _check_each_once(outputs)
        served_a, served_b = _tags(a), _tags(b)
        assert len(served_a) == len(set(served_a)) and len(served_b) == len(set(served_b))
        assert set(served_a) | set(served_b) == {f"T{i}" for i in range(200)}  # nothing lost
        assert len(served_b) > 100  # the survivor took the rest

        a.clear()
        a.start()  # the same port again
        rejoined = False
        for round_ in range(1, 20):
            outputs = llm.generate(_inputs(40, start=1000 * round_))
            _check_each_once(outputs, start=1000 * round_)
            if _tags(a):
                rejoined = True
                break
        assert rejoined, "the restarted replica got no work"


def test_a_failing_replica_is_cooled_down_and_its_request_goes_to_the_other(
    make_fake_vllm: Any, tokenizer_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_fake_vllm(), make_fake_vllm()
    with _client(tokenizer_dir, a, b, max_concurrency=2, pack_size=1) as llm:
        a.fail_next(503, times=2, headers={"Retry-After": "0"})  # the first try and the SDK's one retry
        b.fail_next(503, times=2, headers={"Retry-After": "0"})
        with caplog.at_level(logging.WARNING, logger="vllmclient"):
            outputs = llm.generate(_inputs(2))
    _check_each_once(outputs)  # each first request failed on one replica and was answered by the other
    assert sum(1 for r in a.requests_to("/v1/completions") + b.requests_to("/v1/completions") if r.fault) == 4
    assert "failed (ServerError" in caplog.text and "answers again" in caplog.text


def test_every_replica_down_fails_the_call_within_the_timeout(
    make_fake_vllm: Any, tokenizer_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_fake_vllm(), make_fake_vllm()
    llm = _client(tokenizer_dir, a, b, max_retries=0, timeout=1.0)
    llm.load()
    a.kill()
    b.kill()
    with caplog.at_level(logging.WARNING, logger="vllmclient"):
        outputs = run_with_timeout(lambda: llm.generate(_inputs(30)), timeout=15)
    llm.close()
    assert len(outputs) == 30
    errors = [output["error"] for output in outputs]
    assert all(isinstance(error.exception, ServerUnreachableError) for error in errors), errors
    waited = [error for error in errors if error.message.startswith("Not sent: no replica answered")]
    assert waited and all(a.base_url in error.message and b.base_url in error.message for error in waited)
    assert "every replica is down" in caplog.text


def test_a_replica_back_while_every_one_was_down_takes_the_waiting_requests(
    make_fake_vllm: Any, tokenizer_dir: Any
) -> None:
    a, b = make_fake_vllm(), make_fake_vllm()
    llm = _client(tokenizer_dir, a, b, max_retries=0, timeout=30.0, max_concurrency=2, pack_size=1)
    llm.load()
    a.kill()
    b.kill()
    threading.Timer(1.0, a.start).start()
    outputs = run_with_timeout(lambda: llm.generate(_inputs(20)), timeout=30)
    llm.close()
    kinds = collections.Counter("ok" if "error" not in output else output["error"].type for output in outputs)
    # Only requests that reached both dead replicas fail (at most max_concurrency of them); the rest waited.
    assert kinds["ok"] >= 18 and set(kinds) <= {"ok", "ServerUnreachableError"}, kinds


def test_a_replica_serving_another_model_is_refused_at_load(make_fake_vllm: Any, tokenizer_dir: Any) -> None:
    a = make_fake_vllm()
    other = make_fake_vllm(models=[{"id": "other-model", "max_model_len": 1024}])
    with pytest.raises(ConfigurationError, match="serve different models") as info:
        _client(tokenizer_dir, a, other).load()
    assert other.base_url in str(info.value) and "'other-model'" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="is not served at") as found:
        _client(tokenizer_dir, a, other, model="tiny-llama").load()
    assert other.base_url in str(found.value)


def test_a_replica_down_at_load_is_a_warning_and_the_other_works(
    make_fake_vllm: Any, tokenizer_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a = make_fake_vllm()
    down = _dead_url()
    with caplog.at_level(logging.WARNING, logger="vllmclient"), _client(tokenizer_dir, a, down) as llm:
        outputs = llm.generate(_inputs(10))
    _check_each_once(outputs)
    assert f"replica {down}/v1 failed (ServerUnreachableError" in caplog.text
    with pytest.raises(ServerUnreachableError, match="None of the 2 servers") as info:
        _client(tokenizer_dir, down, _dead_url()).load()
    assert down in str(info.value)


def test_a_replica_list_is_checked_and_saved_as_given() -> None:
    urls = ["http://127.0.0.1:8001", "http://127.0.0.1:8002/v1"]
    llm = ClientvLLM(base_url=urls)
    assert llm.base_url == urls and ClientvLLM.model_validate(llm.model_dump()).base_url == urls
    assert pickle.loads(pickle.dumps(llm)).base_url == urls and copy.deepcopy(llm).base_url == urls
    assert ClientvLLM(base_url=" http://a:1 ").base_url == "http://a:1"  # one server: a str, as before
    for bad, expected in [([], "empty list"), (["http://a:1", "http://a:1/v1"], "more than once"),
                          (["http://a:1", "a:2"], "has no scheme")]:
        with pytest.raises(ConfigurationError, match=expected):
            ClientvLLM(base_url=bad)


def test_a_request_that_timed_out_is_not_sent_again_elsewhere(make_fake_vllm: Any, tokenizer_dir: Any) -> None:
    a, b = make_fake_vllm(), make_fake_vllm()
    with _client(tokenizer_dir, a, b, timeout=1.0, max_concurrency=2, pack_size=1) as llm:
        a.delay_next(5.0, match="[[T0]]")
        b.delay_next(5.0, match="[[T0]]")
        outputs = run_with_timeout(lambda: llm.generate(_inputs(6)), timeout=15)
    assert outputs[0]["error"].type == "ServerTimeoutError", outputs[0]
    _check_each_once(outputs[1:], start=1)
    sent = [r for server in (a, b) for r in server.requests_to("/v1/completions") if "[[T0]]" in str(r.body)]
    assert len(sent) == 1  # once, to one replica: as with one server, a timed-out generation is not re-sent


def test_a_stream_goes_to_a_replica_and_gives_back_its_share(make_fake_vllm: Any, tokenizer_dir: Any) -> None:
    a, b = make_fake_vllm(), make_fake_vllm()
    with _client(tokenizer_dir, a, b) as llm:
        for i in range(3):
            events = list(llm.stream(_inputs(1, start=i)[0], max_new_tokens=4))
            assert isinstance(events[-1], StreamEnd) and events[-1].text.startswith(f"T{i}")
        assert llm._engine is not None
        assert llm._engine.capacity.used == 0 and llm._engine.connections.used == 0
    assert len(_tags(a)) + len(_tags(b)) == 3


@pytest.mark.parametrize("fault", ["503", "killed"])
def test_a_stream_a_replica_fails_before_answering_goes_to_the_other(
    make_fake_vllm: Any, tokenizer_dir: Any, fault: str
) -> None:
    """Nothing of the answer came yet, so nothing is duplicated by sending the stream to another replica."""
    a, b = make_fake_vllm(), make_fake_vllm()
    with _client(tokenizer_dir, a, b) as llm:
        if fault == "503":
            a.fail_next(503, times=2, headers={"Retry-After": "0"})  # the first try and the SDK's one retry
        else:
            a.kill()
        events = run_with_timeout(lambda: list(llm.stream(_inputs(1)[0], max_new_tokens=4)), timeout=60)
        assert isinstance(events[-1], StreamEnd) and events[-1].text.startswith("T0")
        assert llm._engine is not None
        assert llm._engine.capacity.used == 0 and llm._engine.connections.used == 0
    assert _tags(b) == ["T0"]


@pytest.mark.parametrize("fault", ["abort", "cut"])
def test_a_replica_that_aborts_or_cuts_a_stream_is_cooled_down_like_one_that_drops_it(
    make_fake_vllm: Any, tokenizer_dir: Any, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    """A stream aborted (the server shutting down) or cut short says as much about its replica as a dropped
    connection: the replica cools down, and what comes next goes to the other one until a probe finds it well."""
    a, b = make_fake_vllm(), make_fake_vllm()
    with caplog.at_level(logging.WARNING, logger="vllmclient"), _client(tokenizer_dir, a, b) as llm:
        if fault == "abort":
            a.abort_prompts_containing("T0")
        else:
            a.cut_next_stream(after_chunks=1)
        with pytest.raises((ServerError, ConnectionLostError)):
            list(llm.stream(_inputs(1)[0], max_new_tokens=4))
        assert f"replica {a.base_url}/v1 failed" in caplog.text  # cooled down: nothing goes to it until probed
        assert llm._engine is not None
        assert llm._engine.capacity.used == 0 and llm._engine.connections.used == 0


def test_a_replica_that_aborts_a_generation_is_cooled_down(
    make_fake_vllm: Any, tokenizer_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """vLLM aborts the requests in flight when it shuts down: its replica is on its way out, as when it drops them."""
    a, b = make_fake_vllm(), make_fake_vllm()
    for server in (a, b):
        server.abort_prompts_containing("T0")
    with caplog.at_level(logging.WARNING, logger="vllmclient"), _client(tokenizer_dir, a, b) as llm:
        (output,) = llm.generate(_inputs(1))
        assert output["error"].type == "ServerError" and "abort" in output["error"].message
        assert any(f"replica {server.base_url}/v1 failed (ServerError" in caplog.text for server in (a, b))


def test_generations_a_replica_aborts_go_to_the_other_and_nothing_is_lost(make_fake_vllm: Any, tokenizer_dir: Any) -> None:
    """A replica shutting down aborts what it holds (HTTP 200, finish_reason 'abort'): none of that text was
    handed over, so those inputs go to another replica, as when it drops them, for generate and agenerate."""
    import asyncio

    a, b = make_fake_vllm(), make_fake_vllm()
    a.abort_prompts_containing("Say")  # every prompt: it is stopping
    with _client(tokenizer_dir, a, b, max_concurrency=8, pack_size=2) as llm:
        outputs = llm.generate(_inputs(4))
        _check_each_once(outputs)
        assert a.requests_to("/v1/completions"), "the test needs the first pack to reach the aborting replica"
        assert {output["server"] for output in outputs} == {b.base_url + "/v1"}
        _wait_for(lambda: not _down(llm, a))  # probed back in (it answers /health), yet it still aborts
        output = asyncio.run(llm.agenerate(_inputs(1, start=9)[0]))
        assert output["generations"][0].startswith("T9") and output["server"] == b.base_url + "/v1"


def _down(llm: ClientvLLM, server: FakeVLLM) -> bool:
    assert llm._engine is not None
    return any(replica.down_since is not None for replica in llm._engine.replicas.replicas
               if replica.base_url == server.base_url + "/v1")


def test_prompts_are_checked_against_the_smallest_context_of_the_replicas(
    make_fake_vllm: Any, tokenizer_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    long = make_fake_vllm(models=[{"id": "tiny-llama", "max_model_len": 1024}])
    short = make_fake_vllm(models=[{"id": "tiny-llama", "max_model_len": 256}])
    with caplog.at_level(logging.WARNING, logger="vllmclient"), _client(tokenizer_dir, long, short) as llm:
        assert llm.max_model_len == 256
    assert "context lengths differ" in caplog.text


def test_a_replica_back_with_another_model_is_not_used(
    make_fake_vllm: Any, tokenizer_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_fake_vllm(), make_fake_vllm()
    with caplog.at_level(logging.WARNING, logger="vllmclient"), _client(tokenizer_dir, a, b) as llm:
        a.kill()
        _check_each_once(llm.generate(_inputs(20)))  # a's failure cools it down
        with FakeVLLM(tokenizer_dir, port=a.port, models=[{"id": "other-model", "max_model_len": 1024}]) as other:
            _wait_for(lambda: "is back but serves other-model, not 'tiny-llama'" in caplog.text)
            _check_each_once(llm.generate(_inputs(20, start=100)), start=100)
            assert not other.requests_to("/v1/completions")


def test_requests_on_a_killed_replica_go_elsewhere_without_the_sdks_back_off(
    make_fake_vllm: Any, tokenizer_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_fake_vllm(latency=0.2), make_fake_vllm(latency=0.2)
    # the SDK logs its retries here (distilabel silences this logger in its pipelines: set it for the test)
    with caplog.at_level(logging.INFO, logger="openai._base_client"), _client(tokenizer_dir, a, b, max_retries=6) as llm:
        killer = threading.Thread(target=lambda: (_wait_for(lambda: a.in_flight_requests > 0), a.kill()))
        killer.start()
        outputs = run_with_timeout(lambda: llm.generate(_inputs(40)), timeout=60)
        killer.join()
    _check_each_once(outputs)
    # A request cut off by the kill is re-sent once by the SDK (a dropped connection may be a blip); refused
    # then, it goes to the other replica at once instead of through max_retries=6 back-offs (about 25 s).
    assert "Retrying request" in caplog.text and "(retry 2 of 6)" not in caplog.text


def test_requests_cut_off_when_every_replica_restarts_wait_for_them(make_fake_vllm: Any, tokenizer_dir: Any) -> None:
    a, b = make_fake_vllm(latency=0.3), make_fake_vllm(latency=0.3)
    with _client(tokenizer_dir, a, b, max_retries=1, max_concurrency=4, pack_size=1) as llm:

        def restart_both() -> None:
            _wait_for(lambda: a.in_flight_requests > 0 and b.in_flight_requests > 0)
            a.kill()
            b.kill()
            time.sleep(0.5)
            a.start()
            b.start()

        restarter = threading.Thread(target=restart_both)
        restarter.start()
        outputs = run_with_timeout(lambda: llm.generate(_inputs(20)), timeout=60)
        restarter.join()
    _check_each_once(outputs)  # refused everywhere is not a try: they waited, as with one server's SDK retries


def test_the_command_line_runs_a_job_over_two_replicas(make_fake_vllm: Any, tokenizer_dir: Any, tmp_path: Any) -> None:
    a, b = make_fake_vllm(latency=0.02), make_fake_vllm(latency=0.02)
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"q{i}", "messages": _inputs(1, start=i)[0]}) + "\n"
                              for i in range(40)))
    argv = ["run", str(source), "-o", str(out), "--base-url", a.base_url, "--base-url", b.base_url,
            "--tokenizer", str(tokenizer_dir), "--max-tokens", "4", "--max-concurrency", "8", "--no-progress"]
    assert main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(record["custom_id"] for record in records) == sorted(f"q{i}" for i in range(40))
    for record in records:
        assert record["error"] is None and record["response"]["status_code"] == 200
        choice = record["response"]["body"]["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert text.startswith(f"T{record['custom_id'][1:]}"), record
    assert _tags(a) and _tags(b) and sorted(_tags(a) + _tags(b)) == sorted(f"T{i}" for i in range(40))


@pytest.mark.parametrize("fault", ["429", "damaged answer", "401", "404"])
def test_a_replica_that_rate_limits_or_damages_its_answers_sends_its_requests_to_the_other(
    fault: str, make_fake_vllm: Any, tokenizer_dir: Any
) -> None:
    """A 429 after the SDK's retries (a rate limit in front of that server), an answer cut short, a key or model
    it stopped taking (restarted with another --api-key, or without the model) are that replica's trouble, as a
    5xx is: the request goes to another replica. They failed the input instead, and as such a replica answers
    fast, it had the most free room and drew most of the work."""
    a, b = make_fake_vllm(latency=0.02), make_fake_vllm(latency=0.02)
    if fault == "429":
        b.fail_next(429, times=10_000, headers={"Retry-After": "0"})
    elif fault == "damaged answer":
        b.truncate_next(times=10_000)
    else:
        body = {"error": {"message": "The model `tiny-llama` does not exist.", "type": "NotFoundError",
                          "param": "model", "code": 404}} if fault == "404" else None
        b.fail_next(int(fault), body=body, times=10_000)
    with _client(tokenizer_dir, a, b) as llm:
        outputs = run_with_timeout(lambda: llm.generate(_inputs(40)), timeout=60)
    _check_each_once(outputs)
    assert sorted(_tags(a)) == sorted(f"T{i}" for i in range(40))
    assert any(r.fault for r in b.requests_to("/v1/completions"))  # b was tried, and failed


def test_replicas_without_the_chat_batch_route_are_not_cooled_down(
    make_fake_vllm: Any, tokenizer_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A 404 for a path the server does not serve (no /chat/completions/batch, as vLLM before it) says the
    conversations go one per request; it is no replica's trouble. Taken for a model the replica stopped serving,
    it cooled down every replica in turn, and the call waited for their probes."""
    a, b = make_fake_vllm(batch_chat=False), make_fake_vllm(batch_chat=False)
    with _client(tokenizer_dir, a, b, tokenizer=None) as llm, caplog.at_level(logging.WARNING, logger="vllmclient"):
        outputs = run_with_timeout(lambda: llm.generate(_inputs(6)), timeout=60)
        assert llm._engine is not None
        assert all(replica.down_since is None for replica in llm._engine.replicas.replicas)
    _check_each_once(outputs)
    assert "failed (" not in caplog.text


def test_replicas_without_tokenize_are_not_cooled_down_at_load(
    make_fake_vllm: Any, tokenizer_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The tokenizer check at load asks /tokenize; a server without it (404, not vLLM's error object) is not
    checked, and is no replica in trouble: it cooled down every replica before the first request."""
    a, b = make_fake_vllm(), make_fake_vllm()
    for server in (a, b):
        server.fail_next(404, body={"detail": "Not Found"}, path="/tokenize")
    with _client(tokenizer_dir, a, b) as llm, caplog.at_level(logging.WARNING, logger="vllmclient"):
        llm.load()
        assert llm._engine is not None
        assert all(replica.down_since is None for replica in llm._engine.replicas.replicas)
    assert "failed (" not in caplog.text
