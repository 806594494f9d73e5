"""Chat-path packing (``tokenizer=None``): conversations go in packs through vLLM's
``POST /v1/chat/completions/batch`` when the server has it and the request fits it, else one per request.

Every claim is checked on what the fake server saw (recorded bodies and paths) or on the outputs.
"""

from __future__ import annotations

from typing import Any

import pytest

from vllmclient import ClientvLLM

BATCH = "/v1/chat/completions/batch"
CHAT = "/v1/chat/completions"
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def tagged(count: int) -> list[list[dict[str, str]]]:
    return [user(f"[[q{i}]] tell me something") for i in range(count)]


def chat_client(server: Any, **kwargs: Any) -> ClientvLLM:
    return ClientvLLM(base_url=server.base_url, tokenizer=None, max_retries=0, **kwargs)


def starts_with_tag(output: dict[str, Any], index: int) -> bool:
    return all(text is not None and text.split()[0] == f"q{index}" for text in output["generations"])


def conversations_sent(server: Any) -> list[list[dict[str, str]]]:
    """Every conversation that reached the server, batch packs flattened, in arrival order."""
    sent = []
    for request in server.requests:
        if request.path == BATCH:
            sent.extend(request.body["messages"])
        elif request.path == CHAT:
            sent.append(request.body["messages"])
    return sent


# -- packing ---------------------------------------------------------------------------------------


def test_conversations_are_packed_through_the_batch_endpoint(fake_vllm):
    with chat_client(fake_vllm) as llm:
        outputs = llm.generate(tagged(120), max_new_tokens=4, progress=False)
    assert all("error" not in output and starts_with_tag(output, i) for i, output in enumerate(outputs))
    batches = fake_vllm.requests_to(BATCH)
    assert not fake_vllm.requests_to(CHAT)
    sizes = [len(request.body["messages"]) for request in batches]
    assert sum(sizes) == 120 and len(batches) < 120 // 4 and max(sizes) > 1
    assert all(request.body["n"] == 1 and "stream" not in request.body for request in batches)
    for output in outputs:
        assert output["statistics"]["output_tokens"][0] > 0
        assert output["request_id"] and output["latency"] > 0


def test_pack_size_caps_the_conversations_per_batch_request(fake_vllm):
    with chat_client(fake_vllm, pack_size=8) as llm:
        outputs = llm.generate(tagged(50), max_new_tokens=4, progress=False)
    assert all(starts_with_tag(output, i) for i, output in enumerate(outputs))
    sizes = [len(request.body["messages"]) for request in fake_vllm.requests_to(BATCH)]
    assert sum(sizes) == 50 and max(sizes) == 8


def test_pack_size_1_sends_one_conversation_per_chat_request(fake_vllm):
    with chat_client(fake_vllm, pack_size=1) as llm:
        outputs = llm.generate(tagged(20), max_new_tokens=4, progress=False)
    assert all(starts_with_tag(output, i) for i, output in enumerate(outputs))
    assert not fake_vllm.requests_to(BATCH)
    assert len(fake_vllm.requests_to(CHAT)) == 20


def test_batch_and_per_conversation_results_are_identical(make_fake_vllm):
    """Same texts, finish reasons, output counts, logprobs and reasoning, with a fixed seed; the input count is
    the server's exact one where the answer gives it (one conversation per request), else None (the batch answer
    sums usage over its pack and carries no prompt_token_ids)."""
    server = make_fake_vllm(reasoning_parser=True)
    inputs = [user(f"question {i} " + "word " * i) for i in range(24)]
    params = {"max_new_tokens": 12, "seed": 7, "temperature": 0.8, "logprobs": 2, "stop": ["zzz"],
              "min_tokens": 1, "chat_template_kwargs": {"enable_thinking": True}}
    with chat_client(server, pack_size=6) as llm:
        packed = llm.generate(inputs, progress=False, **params)
    assert len(server.requests_to(BATCH)) == 4 and not server.requests_to(CHAT)
    server.clear()
    with chat_client(server, pack_size=1) as llm:
        single = llm.generate(inputs, progress=False, **params)
    assert len(server.requests_to(CHAT)) == 24 and not server.requests_to(BATCH)
    for a, b in zip(packed, single, strict=True):
        for key in ("generations", "finish_reasons", "logprobs", "reasoning"):
            assert a[key] == b[key], key
        assert "tool_calls" not in a and "tool_calls" not in b
        assert a["statistics"]["output_tokens"] == b["statistics"]["output_tokens"]
        assert a["statistics"]["input_tokens"] == [None]
        assert isinstance(b["statistics"]["input_tokens"][0], int)
    assert len({output["generations"][0] for output in packed}) > 1


def test_a_pack_of_one_conversation_reports_its_input_tokens(fake_vllm):
    """A lone conversation goes as a plain chat request, whose answer has the exact prompt count."""
    with chat_client(fake_vllm) as llm:
        (output,) = llm.generate([user("[[q0]] hello")], max_new_tokens=4, progress=False)
    assert not fake_vllm.requests_to(BATCH)
    assert isinstance(output["statistics"]["input_tokens"][0], int)


# -- one bad conversation fails alone ----------------------------------------------------------------


def test_a_too_long_conversation_in_a_pack_fails_alone(fake_vllm):
    fake_vllm.fail_prompts_containing("TOOLONG")  # vLLM's context-length 400 (param input_tokens), whole request
    inputs = tagged(16)
    inputs[5] = user("TOOLONG text")
    with chat_client(fake_vllm, pack_size=16) as llm:
        outputs = llm.generate(inputs, max_new_tokens=4, progress=False)
    error = outputs[5]["error"]
    assert error.index == 5 and error.type == "PromptTooLongError" and error.status_code == 400
    assert outputs[5]["generations"] == [None]
    assert all("error" not in output and starts_with_tag(output, i) for i, output in enumerate(outputs) if i != 5)
    sent = conversations_sent(fake_vllm)
    assert sum(1 for conversation in sent if conversation != inputs[5]) >= 15
    poisoned = [len(r.body["messages"]) for r in fake_vllm.requests_to(BATCH) if inputs[5] in r.body["messages"]]
    assert poisoned[0] == 16 and poisoned[-1] == 2  # halved until alone (then sent as a plain chat request)


def test_a_400_naming_one_conversation_of_the_pack_is_split(fake_vllm):
    body = {"error": {"message": "1 validation error: body.messages.3 ...", "type": "Bad Request",
                      "param": "body.messages.3", "code": 400}}
    with chat_client(fake_vllm, pack_size=8) as llm:
        fake_vllm.fail_next(400, body=body, path=BATCH)
        outputs = llm.generate(tagged(8), max_new_tokens=4, progress=False)
    assert all("error" not in output for output in outputs)  # split, and each half answered
    assert len(fake_vllm.requests_to(BATCH)) == 3


def test_a_400_about_a_sampling_parameter_fails_the_whole_pack_without_splitting(fake_vllm):
    message = "temperature must be in [0, 2], got 3.0."
    body = {"error": {"message": message, "type": "BadRequestError", "param": "temperature", "code": 400}}
    with chat_client(fake_vllm, pack_size=8) as llm:
        fake_vllm.fail_next(400, body=body, path=BATCH)
        outputs = llm.generate(tagged(8), max_new_tokens=4, progress=False)
    assert len(fake_vllm.requests_to(BATCH)) == 1 and not fake_vllm.requests_to(CHAT)
    assert [output["error"].index for output in outputs] == list(range(8))
    assert all(message in output["error"].message for output in outputs)


@pytest.mark.parametrize(
    ("part", "words"),
    [({"type": "input_audio"}, "validation error"), ({"type": "sound"}, "Unsupported chat content part type")],
    ids=["malformed", "unknown-type"],
)
def test_a_conversation_with_a_part_other_than_text_is_sent_alone_and_fails_alone(fake_vllm, part, words):
    """vLLM 0.32's batch endpoint answers a conversation whose part it cannot read as if that message were
    empty, where /chat/completions refuses it; a part type it does not know fails the whole batch (param
    'type'). Such a conversation goes alone, and the server checks it there."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    inputs = tagged(8)
    inputs[2] = [{"role": "user", "content": [{"type": "text", "text": "[[q2]] hear"}, part]}]
    inputs[6] = [{"role": "user", "content": "[[q6]] look"}, {"role": "assistant", "content": [image]},
                 {"role": "user", "content": "and?"}]
    with chat_client(fake_vllm, pack_size=8) as llm:
        outputs = llm.generate(inputs, max_new_tokens=4, progress=False)
    assert outputs[2]["generations"] == [None] and outputs[2]["error"].type == "BadRequestError"
    assert words in outputs[2]["error"].message and outputs[2]["error"].status_code == 400
    assert all("error" not in output and starts_with_tag(output, i) for i, output in enumerate(outputs) if i != 2)
    (batch,) = fake_vllm.requests_to(BATCH)
    assert batch.body["messages"] == [conversation for i, conversation in enumerate(inputs) if i not in (2, 6)]
    assert sorted(len(r.body["messages"]) for r in fake_vllm.requests_to(CHAT)) == [1, 3]


def test_a_batch_answer_missing_a_conversation_fails_its_pack_as_unreadable(fake_vllm):
    answer = {"id": "x", "object": "chat.completion", "model": "tiny-llama", "usage": {},
              "choices": [{"index": 0, "message": {"content": "q0 a"}, "finish_reason": "stop"}]}
    with chat_client(fake_vllm, pack_size=4) as llm:
        fake_vllm.fail_next(200, body=answer, path=BATCH)
        outputs = llm.generate(tagged(4), max_new_tokens=4, progress=False)
    assert all(output["error"].type == "APIError" and "unexpected shape" in output["error"].message
               for output in outputs)


# -- fallback to one request per conversation ------------------------------------------------------


def test_a_server_without_the_batch_endpoint_gets_one_request_per_conversation(make_fake_vllm):
    server = make_fake_vllm(batch_chat=False)
    with chat_client(server, max_concurrency=16) as llm:
        first = llm.generate(tagged(60), max_new_tokens=4, progress=False)
        tried = len(server.requests_to(BATCH))
        server.clear()
        second = llm.generate(tagged(30), max_new_tokens=4, progress=False)
    for outputs in (first, second):
        assert all("error" not in output and starts_with_tag(output, i) for i, output in enumerate(outputs))
        assert all(isinstance(output["statistics"]["input_tokens"][0], int) for output in outputs)
    # at most the packs sent before the first 404 came back: the call's window (2 x 16 slots) in packs of 4
    assert 1 <= tried <= 8
    assert not server.requests_to(BATCH)  # remembered: not asked again
    assert len(server.requests_to(CHAT)) == 30


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"num_generations": 2, "temperature": 1.0}, "n must be 1"),
        ({"tools": TOOLS}, "tools are ignored there"),
        ({"tool_choice": "auto", "tools": TOOLS}, "tool_choice must be 'none'"),
        ({"prompt_logprobs": 1}, "its answer has no prompt_logprobs"),
        ({"extra_body": {"kv_transfer_params": {"x": 1}}}, "a field it does not read"),
    ],
    ids=["n=2", "tools", "tool_choice", "prompt_logprobs", "extra_body"],
)
def test_requests_the_batch_endpoint_cannot_carry_go_one_per_conversation(fake_vllm, params, why):
    with chat_client(fake_vllm) as llm:
        outputs = llm.generate(tagged(12), max_new_tokens=4, progress=False, **params)
    assert all("error" not in output for output in outputs), why
    assert not fake_vllm.requests_to(BATCH), why
    assert len(fake_vllm.requests_to(CHAT)) == 12


def test_structured_output_retries_are_packed_too(fake_vllm):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    fake_vllm.break_structured("BROKEN", times=4)
    inputs = [user(f"BROKEN {i}") for i in range(4)] + [user(f"fine {i}") for i in range(4)]
    with chat_client(fake_vllm, pack_size=8) as llm:
        outputs = llm.generate(inputs, max_new_tokens=30, temperature=1.0, progress=False,
                               structured_outputs={"json": schema}, structured_outputs_retries=2)
    assert all(output["validation_errors"] == [None] for output in outputs)
    sizes = [len(request.body["messages"]) for request in fake_vllm.requests_to(BATCH)]
    assert sizes == [8, 4]  # the four invalid ones asked again in one pack
    assert not fake_vllm.requests_to(CHAT)
