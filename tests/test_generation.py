"""Generation over HTTP: request bodies, result shapes, statistics, the chat path, and error translation."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from transformers import AutoTokenizer

from vllmclient import (
    AuthenticationError,
    BadRequestError,
    ClientvLLM,
    InvalidInputError,
    ModelNotFoundError,
    PromptTooLongError,
    ServerError,
    ServerUnreachableError,
)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def llm(fake_vllm, tokenizer_dir):
    client = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, max_retries=0)
    yield client
    client.close()


def test_generate_returns_distilabel_shape_with_exact_statistics(llm, fake_vllm, tokenizer_dir):
    outputs = llm.generate([user("[[a]] one"), user("[[b]] two")], num_generations=3, max_new_tokens=12, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert [o["generations"][0].split()[0] for o in outputs] == ["a", "b"]
    for output in outputs:
        assert set(output) == {"generations", "statistics", "finish_reasons", "request_id", "latency"}
        assert len(output["generations"]) == 3
        assert all(isinstance(text, str) for text in output["generations"])
        stats = output["statistics"]
        assert len(stats["input_tokens"]) == len(stats["output_tokens"]) == 3
        for text, count, reason in zip(output["generations"], stats["output_tokens"], output["finish_reasons"], strict=True):
            assert count == len(tokenizer.encode(text, add_special_tokens=False))
            assert reason in ("stop", "length")
            assert count <= 12
            if reason == "length":
                assert count == 12
    body = fake_vllm.requests_to("/v1/completions")[-1].body
    for prompt, output in zip(body["prompt"], outputs, strict=True):
        assert output["statistics"]["input_tokens"] == [len(tokenizer.encode(prompt, add_special_tokens=False))] * 3


@pytest.mark.parametrize("chat", [False, True], ids=["template", "chat"])
def test_each_output_has_the_latency_of_its_request(fake_vllm, tokenizer_dir, chat):
    fake_vllm.slow_prompts_containing("[[slow]]", 0.3)
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=None if chat else tokenizer_dir, pack_size=2) as llm:
        outputs = llm.generate([user("[[a]] x"), user("[[b]] y"), user("[[slow]] z"), user("[[c]] w"),
                                [{"role": "user"}]])
        single = asyncio.run(llm.agenerate(user("[[slow]] again")))
    *answered, failed = outputs
    assert "latency" not in failed and "error" in failed  # nothing was sent for it
    for output in [*answered, single]:
        assert isinstance(output["latency"], float) and output["latency"] > 0
    by_request = {}
    for output in answered:  # inputs packed into one request share its latency
        assert by_request.setdefault(output["request_id"], output["latency"]) == output["latency"]
    assert len(by_request) == 2  # chat too: packs of two conversations through /v1/chat/completions/batch
    assert outputs[2]["latency"] >= 0.3 and single["latency"] >= 0.3  # the server's own delay: a lower bound


def test_agenerate_defaults_and_vllm_parameters_in_the_body(llm, fake_vllm):


    output = asyncio.run(llm.agenerate(user("hi")))
    assert len(output["generations"]) == 1
    body = fake_vllm.requests_to("/v1/completions")[-1].body
    assert body["max_tokens"] == 128 and body["n"] == 1 and body["temperature"] == 1.0 and body["top_p"] == 1.0
    assert body["frequency_penalty"] == 0.0 and body["presence_penalty"] == 0.0
    for unset in ("top_k", "min_p", "seed", "stop", "logprobs", "logit_bias"):
        assert unset not in body  # left to the model's generation config

    asyncio.run(
        llm.agenerate(
            user("hi"), num_generations=2, max_new_tokens=5, top_k=20, min_p=0.05, repetition_penalty=1.1,
            seed=7, stop=["."], stop_token_ids=[3], include_stop_str_in_output=True, min_tokens=1,
            ignore_eos=False, skip_special_tokens=False, logit_bias={"5": -1.5},
            extra_body={"structured_outputs": {"choice": ["a", "b"]}, "priority": 0},
        )
    )
    body = fake_vllm.requests_to("/v1/completions")[-1].body
    expected = {"n": 2, "max_tokens": 5, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "seed": 7,
                "stop": ["."], "stop_token_ids": [3], "include_stop_str_in_output": True, "min_tokens": 1,
                "ignore_eos": False, "skip_special_tokens": False, "logit_bias": {"5": -1.5},
                "structured_outputs": {"choice": ["a", "b"]}, "priority": 0}
    assert {k: body[k] for k in expected} == expected


def test_same_seed_same_texts(llm):
    first = llm.generate_outputs([user("story")], num_generations=2, seed=42)
    again = llm.generate_outputs([user("story")], num_generations=2, seed=42)
    assert first == again


def test_stop_strings_and_finish_reason(llm):
    outputs = llm.generate([user("x")] * 5, max_new_tokens=60, stop=["e"], seed=3)
    for output in outputs:
        text, reason = output["generations"][0], output["finish_reasons"][0]
        assert "e" not in text
        assert reason == "stop"


def test_logprobs_in_distilabel_shape(llm):
    output = llm.generate([user("x")], num_generations=2, max_new_tokens=4, logprobs=2)[0]
    assert len(output["logprobs"]) == 2
    for per_generation, count in zip(output["logprobs"], output["statistics"]["output_tokens"], strict=True):
        assert len(per_generation) == count
        for top in per_generation:
            assert 1 <= len(top) <= 3
            assert all(set(entry) == {"token", "logprob"} for entry in top)


def test_httpx_client_kwargs_apply_to_the_http_client(fake_vllm, tokenizer_dir):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir,
                    httpx_client_kwargs={"headers": {"X-Team": "synth"}}) as llm:
        llm.generate_outputs([user("x")])
    assert all(r.headers.get("x-team") == "synth" for r in fake_vllm.requests)


def test_bad_sampling_parameter_fails_before_sending(llm, fake_vllm):
    llm.load()
    fake_vllm.clear()
    with pytest.raises(InvalidInputError, match=r"temperature=-1 is invalid .*\[0, 2\]"):
        llm.generate_outputs([user("x")], temperature=-1)
    with pytest.raises(InvalidInputError, match="unknown generation parameter.*'max_tokens'.*extra_body"):
        llm.generate_outputs([user("x")], max_tokens=3)
    with pytest.raises(InvalidInputError, match="num_generations=0"):
        llm.generate_outputs([user("x")], num_generations=0)
    with pytest.raises(InvalidInputError, match="extra_body may not set n"):
        llm.generate_outputs([user("x")], extra_body={"n": 2})
    assert fake_vllm.requests_to("/v1/completions") == []


# -- the chat path (tokenizer=None) ------------------------------------------------------------------


def test_chat_path_without_tokenizer(fake_vllm):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "[[t1]] hi"}]
    with ClientvLLM(base_url=fake_vllm.base_url) as llm:
        outputs = llm.generate([conversation, user("[[t2]] yo")], num_generations=2, max_new_tokens=8, seed=0)
        single = asyncio.run(llm.agenerate(conversation, logprobs=1, max_new_tokens=3))
    assert [o["generations"][0].split()[0] for o in outputs] == ["t1", "t2"]
    requests = fake_vllm.requests_to("/v1/chat/completions")
    assert len(requests) == 3 and not fake_vllm.requests_to("/v1/completions")
    assert requests[0].body["messages"] == conversation
    assert "add_special_tokens" not in requests[0].body
    for output in outputs:
        assert len(output["generations"]) == 2
        assert all(isinstance(c, int) and c > 0 for c in output["statistics"]["input_tokens"])
        assert all(isinstance(c, int) for c in output["statistics"]["output_tokens"])
        assert all(r in ("stop", "length") for r in output["finish_reasons"])
    assert len(single["logprobs"][0]) == single["statistics"]["output_tokens"][0]


# -- errors ---------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_names_the_url_and_vllm_serve(tokenizer_dir):
    port = _closed_port()
    llm = ClientvLLM(base_url=f"http://127.0.0.1:{port}", tokenizer=tokenizer_dir, max_retries=0)
    with pytest.raises(ServerUnreachableError) as info:
        llm.load()
    assert f"http://127.0.0.1:{port}/v1" in str(info.value) and "vllm serve" in str(info.value)
    llm.close()


def test_a_refused_connection_is_not_called_a_timeout(tokenizer_dir):
    """Nothing listens: the server "could not be reached"; saying it "did not answer in time" sends the user
    to raise ``timeout``. (The SDK's aiohttp transport maps aiohttp's ClientConnectorError to httpx's
    ConnectTimeout, so the SDK raises APITimeoutError for a refused connection too.)"""
    port = _closed_port()
    llm = ClientvLLM(base_url=f"http://127.0.0.1:{port}", tokenizer=tokenizer_dir, max_retries=0)
    with pytest.raises(ServerUnreachableError) as info:
        llm.load()
    llm.close()
    assert "could not be reached" in str(info.value) and "did not answer in time" not in str(info.value)


def test_a_server_slower_than_timeout_did_not_answer_in_time(fake_vllm, tokenizer_dir):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, max_retries=0, timeout=0.2) as llm:
        fake_vllm.latency = 2.0
        output = llm.generate([user("x")], max_new_tokens=4, progress=False)[0]
    assert output["error"].type == "ServerTimeoutError"  # issue #9: a timeout is not an unreachable server
    assert "did not answer within timeout=0.2 seconds" in output["error"].message


def test_wrong_api_key_is_an_authentication_error(make_fake_vllm, tokenizer_dir, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    server = make_fake_vllm(api_key="right")
    with pytest.raises(AuthenticationError) as info:
        ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir).load()
    assert info.value.status_code == 401 and "VLLM_API_KEY" in str(info.value)
    with ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir, api_key="right") as llm:
        assert llm.generate_outputs([user("x")])[0][0]


def test_model_gone_after_load_is_model_not_found(llm, fake_vllm):
    llm.load()
    fake_vllm.fail_next(404, body={"error": {"message": "The model `tiny-llama` does not exist.",
                                             "type": "NotFoundError", "param": "model", "code": 404}})
    with pytest.raises(ModelNotFoundError, match="does not exist.*Served models: tiny-llama"):
        asyncio.run(llm.agenerate(user("x")))


def test_server_side_context_error_keeps_the_servers_numbers(llm, fake_vllm):
    llm.load()
    fake_vllm.fail_prompts_containing("LONG")
    with pytest.raises(PromptTooLongError) as info:
        asyncio.run(llm.agenerate(user("LONG")))
    assert info.value.status_code == 400
    assert info.value.max_model_len == 1024 and info.value.prompt_tokens is not None
    assert "maximum context length is 1024" in str(info.value)


def test_other_bad_request_is_translated(llm, fake_vllm):
    llm.load()
    fake_vllm.fail_next(400, body={"error": {"message": "n must be at least 1, got 0.", "type": "BadRequestError",
                                             "param": None, "code": 400}})
    with pytest.raises(BadRequestError, match="HTTP 400.*n must be at least 1"):
        asyncio.run(llm.agenerate(user("x")))


def test_sdk_retries_5xx_natively(fake_vllm, tokenizer_dir):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, max_retries=2) as llm:
        fake_vllm.fail_next(503, times=2)
        assert llm.generate_outputs([user("x")])[0][0]
        attempts = fake_vllm.requests_to("/v1/completions")
        assert len(attempts) == 3
        assert [r.headers["x-stainless-retry-count"] for r in attempts] == ["0", "1", "2"]


def test_5xx_after_retries_is_a_server_error(llm, fake_vllm):
    llm.load()
    fake_vllm.fail_next(500)
    with pytest.raises(ServerError) as info:
        asyncio.run(llm.agenerate(user("x")))
    assert info.value.status_code == 500 and "server had an error" in str(info.value)


# -- failed inputs are never silent ------------------------------------------------------------------


def test_generate_outputs_warns_with_the_count_and_first_reasons_of_failed_inputs(llm, fake_vllm, caplog):
    fake_vllm.fail_prompts_containing("[[bad]]", message="this prompt is refused")
    inputs = [user("[[bad]] no") if i % 3 == 1 else user(f"[[ok{i}]] yes") for i in range(12)]
    with caplog.at_level(logging.WARNING, logger="vllmclient"):
        texts = llm.generate_outputs(inputs, max_new_tokens=4)
    assert [i for i, t in enumerate(texts) if t == [None]] == [1, 4, 7, 10]
    (record,) = [r for r in caplog.records if r.name == "vllmclient" and r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "4 of 12 inputs failed" in message
    assert "input 1: BadRequestError" in message and "this prompt is refused" in message
    assert "input 4: BadRequestError" in message and "input 7: BadRequestError" in message
    assert "input 10" not in message and "1 more" in message  # the first few, not all
    assert "generate()" in message  # says where the full records are

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllmclient"):
        everything_failed = llm.generate_outputs([user("[[bad]] a"), user("[[bad]] b")], max_new_tokens=4)
    assert everything_failed == [[None], [None]]
    assert "2 of 2 inputs failed" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="vllmclient"):
        llm.generate_outputs([user("fine")], max_new_tokens=4)
    assert "failed" not in caplog.text


def test_generate_logs_failures_at_debug_level_only(llm, fake_vllm, caplog):
    """generate() returns each failure's record, so the summary is a debug line, never a warning."""
    fake_vllm.fail_prompts_containing("[[bad]]", message="this prompt is refused")
    with caplog.at_level(logging.DEBUG, logger="vllmclient"):
        outputs = llm.generate([user("[[bad]] no"), user("[[ok]] yes")], max_new_tokens=4)
    assert outputs[0]["error"].type == "BadRequestError"
    failures = [r for r in caplog.records if "inputs failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.DEBUG]
    assert "1 of 2 inputs failed" in failures[0].getMessage()
    assert "input 0: BadRequestError: " in failures[0].getMessage()
