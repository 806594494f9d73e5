"""Job files as a new user meets them: odd inputs and outputs, two runs at once, what each record and error says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vllmclient import ClientvLLM, ConfigurationError, run_batch_file
from vllmclient._job_output import JobOutput, identity, sidecar_path


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def chat(custom_id: str, text: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def client(fake_vllm: Any) -> Any:
    with ClientvLLM(base_url=fake_vllm.base_url, max_retries=0) as llm:
        yield llm


def test_a_second_run_refused_as_in_use_leaves_the_running_jobs_files_alone(client, tmp_path):
    """The first job locks OUTPUT.job.json before it loads the client and writes its identity after: a second run
    in that window is refused, and must not delete the file the first one holds (its identity would be lost, and
    the output then refused as one 'no vllmclient run wrote')."""
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hello")])
    out = tmp_path / "out.jsonl"
    first = JobOutput(out, identity("0" * 32, source, {}))
    first.check()  # as run_batch_file does before client.load()
    with pytest.raises(ConfigurationError, match="in use by another job"):
        run_batch_file(client, source, out, progress=False, max_new_tokens=4)
    first.begin()
    first.write([{"id": "x", "custom_id": "a", "response": None, "error": None}])
    first.close()
    assert json.loads(sidecar_path(out).read_text())["input"] == "0" * 32
