"""Chat-path packing (``tokenizer=None``) against the real vLLM server's ``POST /v1/chat/completions/batch``."""

from __future__ import annotations

from typing import Any

import pytest
from test_client_real import varied  # the same varied conversations as the client tests

from vllmclient import ClientvLLM, LocalServer

pytestmark = pytest.mark.integration

LONG = "Anna sees the ball in the park every morning. " * 200  # ~2000 tokens, over the 1024 context


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def generate(server: LocalServer, inputs: list[Any], pack_size: int, **params: Any) -> list[dict[str, Any]]:
    with ClientvLLM(base_url=server.base_url, tokenizer=None, pack_size=pack_size, max_retries=0) as client:
        return client.generate(inputs, **params)


def test_packed_and_one_per_request_conversations_give_identical_greedy_results(vllm_server: LocalServer) -> None:
    inputs = [varied(i) for i in range(24)]
    params = {"temperature": 0, "max_new_tokens": 32, "logprobs": 2}
    packed = generate(vllm_server, inputs, 8, **params)
    single = generate(vllm_server, inputs, 1, **params)
    assert all("error" not in output for output in packed + single)
    assert len({output["request_id"] for output in packed}) == 3  # 24 conversations in 3 batch requests
    assert len({output["request_id"] for output in single}) == 24
    for a, b in zip(packed, single, strict=True):
        assert a["generations"] == b["generations"]
        assert a["finish_reasons"] == b["finish_reasons"]
        assert a["logprobs"] == b["logprobs"]
        assert a["statistics"]["output_tokens"] == b["statistics"]["output_tokens"]
        assert a["statistics"]["input_tokens"] == [None]  # the batch answer sums usage over the pack
        assert isinstance(b["statistics"]["input_tokens"][0], int)
    assert len({output["generations"][0] for output in single}) >= 5
    assert len({output["statistics"]["input_tokens"][0] for output in single}) >= 5


def test_a_too_long_conversation_in_a_pack_fails_alone(vllm_server: LocalServer) -> None:
    inputs = [varied(i) for i in range(8)]
    inputs[3] = user(LONG)
    outputs = generate(vllm_server, inputs, 8, temperature=0, max_new_tokens=8)
    assert [("error" in output) for output in outputs] == [False] * 3 + [True] + [False] * 4
    error = outputs[3]["error"]
    assert error.type == "PromptTooLongError" and error.status_code == 400
    assert "maximum context length is 1024" in error.message
    assert len({outputs[i]["request_id"] for i in (4, 5, 6, 7)}) == 1  # the half without it answered as one pack
    alone = generate(vllm_server, [inputs[i] for i in (0, 1, 2, 4, 5, 6, 7)], 1, temperature=0, max_new_tokens=8)
    assert [o["generations"] for o in alone] == [outputs[i]["generations"] for i in (0, 1, 2, 4, 5, 6, 7)]


@pytest.mark.parametrize(
    "part",
    [{"type": "input_audio"}, {"type": "refusal"}, {"type": "weird", "weird": 1}, {"type": "weird"}],
    ids=["audio-without-data", "refusal-without-text", "unknown-type-with-a-field", "unknown-type"],
)
def test_a_conversation_with_a_part_the_server_refuses_fails_alone_in_a_pack(vllm_server: LocalServer, part) -> None:
    """vLLM 0.32's batch endpoint answers the first three as if the message were empty (its /chat/completions
    refuses them) and fails the whole batch for the last: the client sends such a conversation alone."""
    inputs = [varied(i) for i in range(6)]
    inputs[2] = [{"role": "user", "content": [part]}]
    outputs = generate(vllm_server, inputs, 6, temperature=0, max_new_tokens=8)
    assert [("error" in output) for output in outputs] == [False, False, True, False, False, False]
    assert outputs[2]["error"].type == "BadRequestError" and outputs[2]["error"].status_code == 400
    assert len({outputs[i]["request_id"] for i in (0, 1, 3, 4, 5)}) == 1  # the others still share one request
    alone = generate(vllm_server, [inputs[i] for i in (0, 1, 3, 4, 5)], 1, temperature=0, max_new_tokens=8)
    assert [o["generations"] for o in alone] == [outputs[i]["generations"] for i in (0, 1, 3, 4, 5)]
