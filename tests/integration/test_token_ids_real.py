"""Token-id prompts and ``send_token_ids`` against the real vLLM CPU server (issue 10, item 1).

The ids the client makes must be the server's own (``POST /tokenize`` of the rendered prompt with
``add_special_tokens: false``: one BOS), and sending them must give exactly what sending the text gives:
greedy texts, token counts, finish reasons and logprobs.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllmclient import ChatFormatter, ClientvLLM, LocalServer, PromptTooLongError

pytestmark = pytest.mark.integration

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry"]
THINGS = ["ball", "book", "tree", "river", "garden", "cake", "boat", "kite"]


def conversation(i: int) -> list[dict[str, str]]:
    story = " ".join(f"{NAMES[(i + k) % 8]} sees the {THINGS[(i * k) % 8]}." for k in range(i % 5))
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
    messages.append({"role": "user", "content": f"{story} Tell me about {NAMES[i % 8]} and the {THINGS[i % 8]}."})
    return messages


INPUTS = [conversation(i) for i in range(12)]


def server_tokenize(server: LocalServer, text: str) -> list[int]:
    body = {"model": server.served_model_name, "prompt": text, "add_special_tokens": False}
    request = urllib.request.Request(server.root_url + "/tokenize", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        tokens: list[int] = json.loads(response.read())["tokens"]
    return tokens


def comparable(output: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in output.items() if key not in ("request_id", "latency")}


@pytest.fixture(scope="module")
def formatter(vllm_tokenizer_dir: Path) -> ChatFormatter:
    return ChatFormatter.from_pretrained(vllm_tokenizer_dir)


@pytest.fixture(scope="module")
def clients(vllm_server: LocalServer, vllm_tokenizer_dir: Path) -> Iterator[tuple[ClientvLLM, ClientvLLM]]:
    common = {"base_url": vllm_server.base_url, "tokenizer": str(vllm_tokenizer_dir), "max_retries": 0, "pack_size": 8}
    with ClientvLLM(**common) as text, ClientvLLM(**common, send_token_ids=True) as ids:
        yield text, ids


def test_the_clients_ids_are_the_servers_with_one_bos(vllm_server, formatter):
    bos = formatter.tokenizer.bos_token_id
    for item in INPUTS:
        prompt = formatter.render(item)
        ids = formatter.encode(prompt)
        assert ids == server_tokenize(vllm_server, prompt)
        assert ids[0] == bos and ids.count(bos) == 1


@pytest.mark.parametrize(
    "params",
    [{"max_new_tokens": 48, "temperature": 0.0, "logprobs": 2},
     {"max_new_tokens": 24, "temperature": 0.0, "prompt_logprobs": 1, "stop": ["."]},
     {"max_new_tokens": 16, "temperature": 0.0, "truncate_prompt_tokens": 12, "truncation_side": "left"}],
)
def test_send_token_ids_gives_the_text_paths_results(clients, params):
    text, ids = clients
    expected = text.generate(INPUTS, **params)
    got = ids.generate(INPUTS, **params)
    assert all("error" not in output for output in expected)
    assert [comparable(output) for output in got] == [comparable(output) for output in expected]


def test_token_id_inputs_give_the_text_paths_results(clients, formatter):
    text, _ = clients
    expected = text.generate(INPUTS, max_new_tokens=32, temperature=0.0)
    got = text.generate([formatter.encode(formatter.render(item)) for item in INPUTS], max_new_tokens=32,
                        temperature=0.0)
    assert [comparable(output) for output in got] == [comparable(output) for output in expected]


def test_a_too_long_input_in_a_pack_of_ids_fails_alone(clients, formatter):
    _, ids = clients
    long = [{"role": "user", "content": " ".join(["Anna sees the ball."] * 300)}]
    count = len(formatter.encode(formatter.render(long)))
    assert count >= 1024
    outputs = ids.generate([INPUTS[0], long, INPUTS[1], [7] * 2000, INPUTS[2]], max_new_tokens=8, temperature=0.0)
    failed = [index for index, output in enumerate(outputs) if "error" in output]
    assert failed == [1, 3]
    assert isinstance(outputs[1]["error"].exception, PromptTooLongError)
    assert f"{count} tokens" in outputs[1]["error"].message and "2000 tokens" in outputs[3]["error"].message
    assert all(outputs[i]["generations"][0] for i in (0, 2, 4))
