"""Job files against the real vLLM server, where its answer to a line differs from the fake's."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from vllmclient import ClientvLLM, LocalServer, run_batch_file

pytestmark = pytest.mark.integration


def test_an_empty_completion_prompt_fails_its_line_as_the_server_fails_it_alone(vllm_server: LocalServer,
                                                                                tmp_path: Path) -> None:
    """vLLM 0.32 refuses ``"prompt": ""`` (400) but answers ``[""]``: a packed request must not answer it."""
    lines = [{"custom_id": name, "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny-llama", "prompt": prompt, "max_tokens": 3}}
             for name, prompt in [("empty", ""), ("full", "Once upon a time")]]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with ClientvLLM(base_url=vllm_server.base_url, tokenizer=None) as llm:
        run_batch_file(llm, source, tmp_path / "out.jsonl", progress=False)
    got = {record["custom_id"]: record for record in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert got["full"]["error"] is None
    assert got["empty"]["error"] is not None and got["empty"]["error"]["line"] == 1


@pytest.mark.parametrize("top", [None, 2])
def test_a_rendered_chat_lines_logprobs_are_the_servers_chat_answer(vllm_server: LocalServer, top: int | None,
                                                                   tmp_path: Path) -> None:
    """With --tokenizer a chat line goes as a completion; its record's logprobs are what vLLM's chat path answers the
    line alone (a completion's top_logprobs also hold the sampled token when it is not among the top k)."""
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12,
            "temperature": 1.5, "seed": 11, "logprobs": True, **({} if top is None else {"top_logprobs": top})}
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": body})
                      + "\n")
    with ClientvLLM(base_url=vllm_server.base_url, tokenizer=str(vllm_server.model_dir)) as llm:
        run_batch_file(llm, source, tmp_path / "out.jsonl", progress=False)
    (record,) = map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())
    request = urllib.request.Request(vllm_server.base_url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as answer:
        alone = json.loads(answer.read())
    mine, theirs = record["response"]["body"]["choices"][0], alone["choices"][0]
    assert mine["message"]["content"] == theirs["message"]["content"]
    assert mine["logprobs"] == theirs["logprobs"]


def test_each_record_is_field_for_field_what_the_server_answers_its_line_alone(vllm_server: LocalServer,
                                                                              tmp_path: Path) -> None:
    """With --tokenizer chat lines go as completions and lines sharing a body are packed; each record's body must
    still be the server's own answer to the line alone, every field and value but its id and time (a rendered chat
    line had an empty "tool_calls", which vLLM leaves out; a packed line's usage lost completion_tokens_details)."""
    lines = []
    for i in range(3):
        lines.append({"custom_id": f"chat{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "tiny-llama", "messages": [{"role": "user", "content": f"Tell {i}"}], "n": 2,
                               "seed": 7, "max_tokens": 5, "logprobs": True, "top_logprobs": 1}})
        lines.append({"custom_id": f"text{i}", "method": "POST", "url": "/v1/completions",
                      "body": {"model": "tiny-llama", "prompt": f"Story {i} begins", "n": 2, "seed": 11,
                               "max_tokens": 6, "logprobs": 1, "stop": ["."]}})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with ClientvLLM(base_url=vllm_server.base_url, tokenizer=str(vllm_server.model_dir)) as llm:
        summary = run_batch_file(llm, source, tmp_path / "out.jsonl", progress=False)
    assert summary.done == len(lines)
    got = {record["custom_id"]: record for record in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    volatile = {"id", "created", "system_fingerprint"}
    for line in lines:
        request = urllib.request.Request(vllm_server.base_url + line["url"].removeprefix("/v1"),
                                         data=json.dumps(line["body"]).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as answer:
            alone = json.loads(answer.read())
        body = got[line["custom_id"]]["response"]["body"]
        assert {k: v for k, v in body.items() if k not in volatile} == {
            k: v for k, v in alone.items() if k not in volatile}, line["custom_id"]
