"""Tests of the fake vLLM server itself (real HTTP: urllib, aiohttp, openai SDK)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from fake_vllm import FakeVLLM

MODEL = "tiny-llama"


def http(base: str, path: str, body: Any = None, *, method: str | None = None,
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
    """Plain urllib call; returns (status, decoded JSON or text, lower-cased headers)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(base + path, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, payload, rh = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, payload, rh = e.code, e.read(), e.headers
    try:
        decoded: Any = json.loads(payload) if payload else None
    except ValueError:
        decoded = payload.decode()
    return status, decoded, {k.lower(): v for k, v in rh.items()}


def sdk(server: FakeVLLM, **kw: Any) -> openai.AsyncOpenAI:
    kw.setdefault("api_key", "EMPTY")
    kw.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", **kw)


def raw_post(server: FakeVLLM, path: str, body: Any) -> tuple[bytes, str]:
    """One HTTP/1.1 POST on a bare socket: (every byte received, "eof" or "reset" for how it ended)."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + data)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            return received, "reset"
    return received, "eof"


def content_length(head: bytes) -> int:
    (line,) = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return int(line.split(b":")[1])


def token_count(server: FakeVLLM, prompt: str, add_special_tokens: bool = True) -> int:
    status, body, _ = http(server.base_url, "/tokenize", {"prompt": prompt, "add_special_tokens": add_special_tokens})
    assert status == 200
    return body["count"]


def test_health_version_models_and_lora_card(tokenizer_dir: Path) -> None:
    models = [{"id": "base", "max_model_len": 512}, {"id": "my-lora", "parent": "base"}]
    with FakeVLLM(tokenizer_dir, models=models) as server:
        status, body, _ = http(server.base_url, "/health", method="GET")
        assert (status, body) == (200, None)
        assert http(server.base_url, "/version", method="GET")[1] == {"version": "0.33.0"}
        status, body, _ = http(server.base_url, "/v1/models", method="GET")
        assert status == 200 and body["object"] == "list"
        base, lora = body["data"]
        assert base["id"] == "base" and base["object"] == "model" and base["owned_by"] == "vllm"
        assert base["parent"] is None and base["max_model_len"] == 512 and base["permission"]
        assert lora["parent"] == "base" and "max_model_len" not in lora
        # LoRA requests answer under the adapter name, with the base model's context length.
        status, body, _ = http(server.base_url, "/v1/completions", {"model": "my-lora", "prompt": "Hi", "max_tokens": 3})
        assert status == 200 and body["model"] == "my-lora"
        status, body, _ = http(server.base_url, "/v1/completions", {"prompt": "Hi"})  # model optional
        assert status == 200 and body["model"] == "base"
        assert http(server.base_url, "/tokenize", {"prompt": "Hi"})[1]["max_model_len"] == 512


@pytest.mark.asyncio
async def test_packed_prompts_n2_prompt_major_with_tag_echo(fake_vllm: FakeVLLM) -> None:
    prompts = ["Write about cats [[P0]]", "Now dogs [[P1]]", "[[P2]] and birds"]
    async with sdk(fake_vllm) as client:
        resp = await client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=12, seed=7,
                                               extra_body={"return_token_ids": True})
    assert [c.index for c in resp.choices] == list(range(6))
    for c in resp.choices:
        assert c.text.startswith(f"P{c.index // 2}")
        assert c.finish_reason in ("stop", "length")
        assert c.model_extra["stop_reason"] is None
        assert len(c.model_extra["token_ids"]) <= 12
    expected_prompt = sum(token_count(fake_vllm, p) for p in prompts)
    assert resp.usage.prompt_tokens == expected_prompt  # each prompt once, not x n
    assert resp.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in resp.choices)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.choices[0].model_extra["prompt_token_ids"][0] == resp.choices[1].model_extra["prompt_token_ids"][0]
    body = fake_vllm.requests_to("/v1/completions")[0].body
    assert body["prompt"] == prompts and body["n"] == 2 and body["return_token_ids"] is True


@pytest.mark.asyncio
async def test_double_bos_counted_by_default(fake_vllm: FakeVLLM) -> None:
    text = "Hello there"
    plain = token_count(fake_vllm, text)  # BOS + text
    url = fake_vllm.base_url + "/v1/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={"prompt": "<|begin_of_text|>" + text, "max_tokens": 2}) as r:
            doubled = (await r.json())["usage"]["prompt_tokens"]
        async with session.post(url, json={"prompt": "<|begin_of_text|>" + text, "max_tokens": 2,
                                           "add_special_tokens": False}) as r:
            single = (await r.json())["usage"]["prompt_tokens"]
    assert doubled == plain + 1
    assert single == plain


@pytest.mark.asyncio
async def test_context_length_is_bad_request_and_output_is_clamped(fake_vllm: FakeVLLM) -> None:
    long_prompt = "the cat sees a red ball " * 300
    async with sdk(fake_vllm) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=MODEL, prompt=["short one", long_prompt], max_tokens=4)
        err = info.value
        assert err.status_code == 400 and err.code == "400"
        assert err.body["type"] == "BadRequestError" and err.body["param"] == "input_tokens"
        assert err.body["message"].startswith("This model's maximum context length is 1024 tokens. However, your "
                                              "prompt contains at least 1025 input tokens")
        assert err.body["message"].endswith("(parameter=input_tokens, value=1025)")
        assert fake_vllm.completion_requests == 0

        # Fits alone but not with the output: 200, max_tokens silently clamped.
        fits = "the cat sees a red ball " * 160
        n_prompt = token_count(fake_vllm, fits)
        assert n_prompt < 1024
        resp = await client.completions.create(model=MODEL, prompt=fits, max_tokens=1000, extra_body={"ignore_eos": True})
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.prompt_tokens == n_prompt and resp.usage.total_tokens == 1024

        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=2000)
        assert info.value.body["message"].startswith("max_tokens=2000 cannot be greater than max_model_len=1024.")


@pytest.mark.asyncio
async def test_api_key_401_body_is_a_string(tokenizer_dir: Path) -> None:
    with FakeVLLM(tokenizer_dir, api_key="sekret") as server:
        async with sdk(server, api_key="wrong") as client:
            with pytest.raises(openai.AuthenticationError) as info:
                await client.completions.create(model=MODEL, prompt="hi")
        assert info.value.body == "Unauthorized"
        assert http(server.base_url, "/v1/models", method="GET")[:2] == (401, {"error": "Unauthorized"})
        assert http(server.base_url, "/health", method="GET")[0] == 200  # not guarded
        assert http(server.base_url, "/tokenize", {"prompt": "hi"})[0] == 200  # not guarded
        async with sdk(server, api_key="sekret") as client:
            resp = await client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
        assert resp.choices[0].text
        assert server.requests[-1].headers["authorization"] == "Bearer sekret"


@pytest.mark.asyncio
async def test_fail_next_503_is_retried_by_the_sdk(fake_vllm: FakeVLLM) -> None:
    fake_vllm.fail_next(503, times=2, headers={"retry-after-ms": "10"})
    async with sdk(fake_vllm, max_retries=2) as client:
        resp = await client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert resp.choices[0].text
    recorded = fake_vllm.requests_to("/v1/completions")
    assert len(recorded) == 3
    assert [r.headers.get("x-stainless-retry-count") for r in recorded] == ["0", "1", "2"]
    assert fake_vllm.completion_requests == 1

    fake_vllm.fail_next(503)
    async with sdk(fake_vllm) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model=MODEL, prompt="hi")
    assert info.value.status_code == 503
    assert info.value.body["type"] == "Service Unavailable" and info.value.body["code"] == 503
    assert info.value.body["message"].startswith("The engine is currently busy")


@pytest.mark.asyncio
async def test_latency_and_in_flight_high_water_marks(fake_vllm: FakeVLLM) -> None:
    fake_vllm.latency = 0.3
    async with sdk(fake_vllm) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(
            client.completions.create(model=MODEL, prompt=[f"a{i}", f"b{i}", f"c{i}"], n=2, max_tokens=4)
            for i in range(5)))
        elapsed = time.perf_counter() - start
    assert all(len(r.choices) == 6 for r in results)
    assert 0.3 <= elapsed < 1.5  # served concurrently
    assert fake_vllm.max_in_flight_requests == 5
    assert fake_vllm.max_in_flight_sequences == 5 * 3 * 2
    assert fake_vllm.completion_requests == 5
    fake_vllm.clear()
    assert (fake_vllm.requests, fake_vllm.completion_requests) == ([], 0)
    assert (fake_vllm.max_in_flight_requests, fake_vllm.max_in_flight_sequences) == (0, 0)


def test_fail_prompts_containing_fails_the_whole_request(fake_vllm: FakeVLLM) -> None:
    fake_vllm.fail_prompts_containing("POISON")
    status, body, _ = http(fake_vllm.base_url, "/v1/completions", {"prompt": ["fine", "has POISON", "ok"]})
    assert status == 400
    assert body["error"]["type"] == "BadRequestError" and body["error"]["param"] == "input_tokens"
    assert "choices" not in body
    assert http(fake_vllm.base_url, "/v1/completions", {"prompt": ["fine", "ok"]})[0] == 200
    fake_vllm.fail_prompts_containing("BOOM", status=400, message="custom failure")
    status, body, _ = http(fake_vllm.base_url, "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "BOOM"}]})
    assert (status, body["error"]["message"], body["error"]["param"]) == (400, "custom failure", None)


def test_validation_errors_mirror_vllm(fake_vllm: FakeVLLM) -> None:
    base = fake_vllm.base_url

    def error(body: Any) -> dict[str, Any]:
        status, payload, _ = http(base, "/v1/completions", body)
        assert status == payload["error"]["code"]
        return payload["error"]

    assert error({"prompt": "hi", "n": 0})["message"] == "n must be at least 1, got 0."
    assert error({"prompt": "hi", "temperature": -1})["message"] == (
        "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)")
    e = error({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]})
    assert e["type"] == "Bad Request" and e["message"].startswith("1 validation error:")
    e = error({"prompt": "hi", "max_tokens": "four"})
    assert (e["type"], e["param"]) == ("Bad Request", "body.max_tokens")
    assert error({"prompt": "hi", "max_tokens": 0})["param"] == "max_tokens"
    assert error({"prompt": "hi", "logprobs": 21})["param"] == "logprobs"
    assert error({"prompt": ""})["type"] == "BadRequestError"
    assert error({"max_tokens": 3})["type"] == "BadRequestError"
    e = error({"model": "nope", "prompt": "hi"})
    assert e == {"message": "The model `nope` does not exist. Valid aliases: tiny-llama.", "type": "NotFoundError",
                 "param": "model", "code": 404}
    assert http(base, "/v1/nothing", {"prompt": "hi"})[:2] == (404, {"detail": "Not Found"})
    assert http(base, "/v1/completions", method="GET")[:2] == (405, {"detail": "Method Not Allowed"})
    status, payload, _ = http(base, "/v1/completions", raw=b"{not json")
    assert status == 400 and payload["error"]["type"] == "Bad Request"
    assert http(base, "/v1/completions", {"prompt": "hi", "some_unknown_field": 1})[0] == 200


@pytest.mark.asyncio
async def test_chat_completion_with_tag_and_token_ids(fake_vllm: FakeVLLM) -> None:
    messages = [{"role": "system", "content": "Be brief [[SYS]]"}, {"role": "user", "content": "Hi there [[U7]]"}]
    async with sdk(fake_vllm) as client:
        resp = await client.chat.completions.create(model=MODEL, messages=messages, n=2, max_completion_tokens=10,
                                                    seed=1, logprobs=True, top_logprobs=2,
                                                    extra_body={"return_token_ids": True})
    status, tok, _ = http(fake_vllm.base_url, "/tokenize", {"messages": messages})
    assert status == 200
    assert resp.usage.prompt_tokens == tok["count"]
    assert resp.model_extra["prompt_token_ids"] == tok["tokens"]
    bos = http(fake_vllm.base_url, "/tokenize", {"prompt": ""})[1]["tokens"]
    assert tok["tokens"][0] == bos[0] and tok["tokens"].count(bos[0]) == 1  # template BOS only
    assert [c.index for c in resp.choices] == [0, 1]
    for c in resp.choices:
        assert c.message.role == "assistant" and c.message.content.startswith("U7")
        assert len(c.logprobs.content) == len(c.model_extra["token_ids"])
        assert all(len(lp.top_logprobs) == 2 for lp in c.logprobs.content)
    assert resp.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in resp.choices)


def test_seeded_output_is_reproducible_and_stop_strings_cut(fake_vllm: FakeVLLM) -> None:
    body = {"prompt": "Tell me a story", "n": 3, "max_tokens": 40, "seed": 11}
    first = http(fake_vllm.base_url, "/v1/completions", body)[1]
    again = http(fake_vllm.base_url, "/v1/completions", body)[1]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert len({c["text"] for c in first["choices"]}) > 1
    stopped = http(fake_vllm.base_url, "/v1/completions", {**body, "stop": ["."], "ignore_eos": True})[1]
    for c in stopped["choices"]:
        assert "." not in c["text"]
        assert (c["finish_reason"], c["stop_reason"]) in (("stop", "."), ("length", None))
    kept = http(fake_vllm.base_url, "/v1/completions",
                {**body, "stop": ["."], "ignore_eos": True, "include_stop_str_in_output": True})[1]
    for a, b in zip(stopped["choices"], kept["choices"], strict=True):
        if a["stop_reason"] == ".":
            assert b["text"] == a["text"] + "."


def test_request_id_header_echo(tokenizer_dir: Path) -> None:
    with FakeVLLM(tokenizer_dir, request_id_headers=True) as server:
        status, body, headers = http(server.base_url, "/v1/completions", {"prompt": "hi"},
                                     headers={"X-Request-Id": "abc123"})
        assert status == 200 and body["id"] == "cmpl-abc123" and headers["x-request-id"] == "abc123"


@pytest.mark.asyncio
async def test_streaming_and_dropped_connection(fake_vllm: FakeVLLM) -> None:
    async with sdk(fake_vllm) as client:
        stream = await client.completions.create(model=MODEL, prompt=["x [[A]]", "y [[B]]"], n=2, max_tokens=9, seed=3,
                                                 stream=True, stream_options={"include_usage": True})
        texts: dict[int, str] = {}
        usage = None
        async for chunk in stream:
            if chunk.choices:
                texts[chunk.choices[0].index] = texts.get(chunk.choices[0].index, "") + chunk.choices[0].text
            else:
                usage = chunk.usage
        plain = await client.completions.create(model=MODEL, prompt=["x [[A]]", "y [[B]]"], n=2, max_tokens=9, seed=3)
        assert [texts[i] for i in range(4)] == [c.text for c in plain.choices]
        assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens

        fake_vllm.drop_next()
        with pytest.raises(openai.APIConnectionError):
            await client.completions.create(model=MODEL, prompt="hi")
        assert (await client.completions.create(model=MODEL, prompt="hi")).choices


# -- injected faults, as seen on the wire -----------------------------------------------------------

COMPLETION = {"model": MODEL, "prompt": "hi [[A]]", "max_tokens": 5}


def test_connection_faults_on_the_wire(fake_vllm: FakeVLLM) -> None:
    received, end = raw_post(fake_vllm, "/v1/completions", COMPLETION)
    head, _, body = received.partition(b"\r\n\r\n")
    assert end == "eof" and head.startswith(b"HTTP/1.1 200") and len(body) == content_length(head)

    fake_vllm.reset_next()
    assert raw_post(fake_vllm, "/v1/completions", COMPLETION) == (b"", "reset")

    fake_vllm.drop_next()
    assert raw_post(fake_vllm, "/v1/completions", COMPLETION) == (b"", "eof")

    fake_vllm.reset_next(after_bytes=10)
    received, end = raw_post(fake_vllm, "/v1/completions", COMPLETION)
    head, _, part = received.partition(b"\r\n\r\n")
    assert end == "reset" and head.startswith(b"HTTP/1.1 200") and part == body[:10]
    assert content_length(head) > 10  # the head promised the whole answer

    fake_vllm.truncate_next(keep=25)
    received, end = raw_post(fake_vllm, "/v1/completions", COMPLETION)
    head, _, part = received.partition(b"\r\n\r\n")
    assert end == "eof" and head.startswith(b"HTTP/1.1 200") and content_length(head) == len(part) == 25
    with pytest.raises(ValueError):
        json.loads(part)

    assert [r.fault for r in fake_vllm.requests_to("/v1/completions")] == [None, "reset", "drop", "reset", "truncate"]
    assert fake_vllm.completion_requests == 3  # the mid-body reset and the truncated answer were generated


def test_faults_apply_in_order_to_the_requests_they_match(fake_vllm: FakeVLLM) -> None:
    fake_vllm.fail_next(500, match="[[B]]")
    fake_vllm.fail_next(502, body="<html>Bad Gateway</html>", content_type="text/html", times=2)
    a, b = {**COMPLETION, "prompt": "x [[A]]"}, {**COMPLETION, "prompt": "y [[B]]"}
    status, body, headers = http(fake_vllm.base_url, "/v1/completions", a)
    assert (status, body, headers["content-type"].split(";")[0]) == (502, "<html>Bad Gateway</html>", "text/html")
    assert http(fake_vllm.base_url, "/v1/completions", b)[0] == 500  # the first fault it matches
    assert http(fake_vllm.base_url, "/v1/completions", b)[0] == 502
    assert http(fake_vllm.base_url, "/v1/completions", a)[0] == 200
    assert [r.fault for r in fake_vllm.requests_to("/v1/completions")] == ["502", "500", "502", None]
    with pytest.raises(ValueError, match="times"):
        fake_vllm.drop_next(times=0)


def test_delay_next_answers_late(fake_vllm: FakeVLLM) -> None:
    fake_vllm.delay_next(0.3)
    started = time.monotonic()
    assert http(fake_vllm.base_url, "/v1/completions", COMPLETION)[0] == 200
    assert time.monotonic() - started >= 0.3  # a lower bound: a busy machine only adds to it
    assert [r.fault for r in fake_vllm.requests_to("/v1/completions")] == ["delay"]


def test_kill_resets_requests_in_flight_and_start_serves_again_on_the_same_port(fake_vllm: FakeVLLM) -> None:
    fake_vllm.latency = 5.0
    outcome: list[tuple[bytes, str]] = []
    worker = threading.Thread(target=lambda: outcome.append(raw_post(fake_vllm, "/v1/completions", COMPLETION)))
    worker.start()
    deadline = time.monotonic() + 10
    while fake_vllm.in_flight_requests == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    port = fake_vllm.port
    fake_vllm.kill()
    worker.join(10)
    assert outcome == [(b"", "reset")]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()

    fake_vllm.latency = 0.0
    fake_vllm.start()
    assert fake_vllm.port == port and fake_vllm.base_url == f"http://127.0.0.1:{port}"
    assert http(fake_vllm.base_url, "/v1/completions", COMPLETION)[0] == 200
    assert len(fake_vllm.requests_to("/v1/completions")) == 2  # what was recorded before survives
    assert fake_vllm.in_flight_requests == 0 and fake_vllm.completion_requests == 1


def test_structured_outputs_constrain_the_text_in_the_form_the_version_reads(make_fake_vllm) -> None:
    new, old = make_fake_vllm(), make_fake_vllm(version="0.11.2")
    choice = {"model": MODEL, "prompt": "x", "max_tokens": 20, "n": 4}

    def texts(server: FakeVLLM, **fields: Any) -> list[str]:
        return [c["text"] for c in http(server.base_url, "/v1/completions", {**choice, **fields})[1]["choices"]]

    assert set(texts(new, structured_outputs={"choice": ["yes", "no"]})) <= {"yes", "no"}
    assert set(texts(old, guided_choice=["yes", "no"])) <= {"yes", "no"}
    assert not set(texts(old, structured_outputs={"choice": ["yes", "no"]})) <= {"yes", "no"}  # ignored there
    assert not set(texts(new, guided_choice=["yes", "no"])) <= {"yes", "no"}  # removed in 0.12: ignored
    status, body, _ = http(new.base_url, "/v1/completions",
                           {**choice, "structured_outputs": {"choice": ["a"], "regex": "a"}})
    assert status == 400 and "only use one kind" in body["error"]["message"]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"enum": ["a", "b"]}}}
    for text in texts(new, structured_outputs={"json": schema}):
        value = json.loads(text)
        assert isinstance(value["n"], int) and value["s"] in ("a", "b")
    assert texts(new, prompt="[[2024-05-17]]", structured_outputs={"regex": r"\d+-\d+-\d+"}) == ["2024-05-17"] * 4
    new.break_structured("odd", times=1)
    broken = texts(new, prompt="an odd one", structured_outputs={"choice": ["yes", "no"]})
    assert broken[0] not in ("yes", "no") and set(broken[1:]) <= {"yes", "no"}


def test_batch_chat_answers_as_vllm_0_32(fake_vllm: FakeVLLM, make_fake_vllm) -> None:
    """POST /v1/chat/completions/batch: one choice per conversation, summed usage, no prompt_token_ids; n must be
    1; one bad conversation fails the whole request; tools are ignored without a word (as vLLM 0.32)."""
    base = fake_vllm.base_url
    convs = [[{"role": "user", "content": "[[a]] hi"}], [{"role": "user", "content": "[[b]] hello there"}]]
    body = {"model": MODEL, "messages": convs, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    status, data, _ = http(base, "/v1/chat/completions/batch", body)
    assert status == 200 and data["prompt_token_ids"] is None
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert [c["message"]["content"].split()[0] for c in data["choices"]] == ["a", "b"]
    singles = [http(base, "/v1/chat/completions", {**body, "messages": conv})[1] for conv in convs]
    assert [c["message"]["content"] for c in data["choices"]] == [s["choices"][0]["message"]["content"] for s in singles]
    assert data["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert data["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in data["choices"])

    status, data, _ = http(base, "/v1/chat/completions/batch", {**body, "n": 2, "temperature": 1})
    assert status == 400 and data["error"]["param"] == "n" and "n > 1" in data["error"]["message"]
    status, data, _ = http(base, "/v1/chat/completions/batch", {**body, "tool_choice": "auto"})
    assert status == 400 and data["error"]["param"] == "body.tool_choice"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    status, data, _ = http(base, "/v1/chat/completions/batch", {**body, "tools": tools})
    assert status == 200 and all("tool_calls" not in c["message"] for c in data["choices"])
    long = [{"role": "user", "content": "word " * 2000}]
    status, data, _ = http(base, "/v1/chat/completions/batch", {**body, "messages": [convs[0], long]})
    assert status == 400 and data["error"]["param"] in ("input_tokens", "input_text")
    status, data, _ = http(base, "/v1/chat/completions/batch", {**body, "messages": [convs[0], []]})
    assert status == 400 and data["error"]["param"] == "body.messages.1"

    without = make_fake_vllm(batch_chat=False)
    status, data, _ = http(without.base_url, "/v1/chat/completions/batch", body)
    assert status == 404 and data == {"detail": "Not Found"}
