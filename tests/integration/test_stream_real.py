"""Streaming against the real vLLM CPU server (needs scripts/setup-vllm.sh): what a stream yields equals what
agenerate returns, on both paths, and leaving a stream early aborts the request in vLLM's engine."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest

from vllmclient import ClientvLLM, LocalServer, StreamEnd, TextDelta

pytestmark = pytest.mark.integration


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def metric(server: LocalServer, name: str, **labels: str) -> float:
    """The sum of a /metrics series over the lines whose labels include ``labels``."""
    with urllib.request.urlopen(server.root_url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith(name + "{") and all(label in line for label in wanted)
    )


@pytest.mark.parametrize("chat", [False, True], ids=["template", "chat"])
def test_a_stream_yields_what_agenerate_returns(vllm_server: LocalServer, vllm_tokenizer_dir: Path, chat: bool) -> None:
    tokenizer = None if chat else str(vllm_tokenizer_dir)
    with ClientvLLM(base_url=vllm_server.base_url, tokenizer=tokenizer, max_retries=0) as llm:
        params = {"max_new_tokens": 24, "temperature": 0.0}
        *deltas, end = llm.stream(user("Tell me about the cat."), **params)
        whole = asyncio.run(llm.agenerate(user("Tell me about the cat."), **params))
    assert isinstance(end, StreamEnd) and all(isinstance(delta, TextDelta) for delta in deltas)
    assert len(deltas) > 1
    assert end.text == "".join(delta.text for delta in deltas) == whole["generations"][0]
    assert end.finish_reason == whole["finish_reasons"][0]
    assert end.output_tokens == whole["statistics"]["output_tokens"][0]
    assert end.input_tokens == whole["statistics"]["input_tokens"][0]
    assert end.time_to_first_token is not None and 0 < end.time_to_first_token <= end.latency


def test_breaking_out_of_a_stream_aborts_the_request_in_vllm(vllm_server: LocalServer) -> None:
    """vLLM does not count a client's abort in request_success_total{finished_reason="abort"}: the request
    leaving the running set having generated far fewer tokens than it was to shows the abort."""
    generated = metric(vllm_server, "vllm:generation_tokens_total")
    with ClientvLLM(base_url=vllm_server.base_url, max_retries=0, max_concurrency=1) as llm:
        for event in llm.stream(user("Write a long story."), max_new_tokens=900, ignore_eos=True):
            assert isinstance(event, TextDelta)
            break
        deadline = time.monotonic() + 60  # a deadline against hanging, not a timed assertion
        while metric(vllm_server, "vllm:num_requests_running") > 0:
            assert time.monotonic() < deadline, "vLLM still runs the request"
            time.sleep(0.2)
        tokens = metric(vllm_server, "vllm:generation_tokens_total") - generated
        assert tokens < 900, f"{tokens} tokens generated: the request ran to its end"  # stopped, not finished
        assert llm.generate_outputs([user("Say hello.")], max_new_tokens=4)[0][0]  # the slot was given back
