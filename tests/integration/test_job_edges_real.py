"""Job files against the real vLLM server, where its answer to a line differs from the fake's."""

from __future__ import annotations

import json
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
