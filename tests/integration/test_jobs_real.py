"""``vllmclient run`` survives a crash of the real vLLM server: the job (a subprocess) ends with error records
for what was cut, and repeated once the server is back it ends with exactly one record per input line, each
with the text of a clean seeded run. The module starts its own server (it kills it), twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllmclient import LocalServer
from vllmclient.cli import main
from vllmclient.local_server import _group_alive

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PLAIN, COMPLETIONS = 32, 16
CUT_AFTER = 6  # records written when the server is killed
DEADLINE_S = 180.0


def job_lines() -> list[Any]:
    lines: list[Any] = [{"custom_id": f"q{i}", "messages": [{"role": "user", "content": f"Tell me about number {i}."}]}
                        for i in range(PLAIN)]
    lines += [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
               "body": {"model": "tiny-llama", "prompt": f"Once upon a time, {i}", "max_tokens": 24, "seed": 100 + i,
                        "ignore_eos": True}}
              for i in range(COMPLETIONS)]
    return lines


def command(server: LocalServer, source: Path, out: Path) -> list[str]:
    """Paced (2 sequences at a time, 40 tokens each) so that the crash lands mid-job; seeded."""
    return ["run", str(source), "-o", str(out), "--base-url", server.base_url, "--tokenizer", str(server.model_dir),
            "--max-concurrency", "2", "--max-retries", "1", "--timeout", "30", "--max-tokens", "40", "--ignore-eos",
            "--seed", "7", "--no-progress"]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def texts(record: dict[str, Any]) -> list[str]:
    return [choice["message"]["content"] if "message" in choice else choice["text"]
            for choice in record["response"]["body"]["choices"]]


def crash(server: LocalServer) -> None:
    assert server.pid is not None and os.getpgid(server.pid) == server.pid
    os.killpg(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _group_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop()


@pytest.fixture(scope="module")
def own_server(vllm_server_python: str) -> Iterator[LocalServer]:
    with LocalServer(python=vllm_server_python) as server:
        yield server


def test_a_job_cut_by_a_server_crash_ends_after_a_rerun_as_a_clean_seeded_run(
    own_server: LocalServer, vllm_server_python: str, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in job_lines()))
    total = PLAIN + COMPLETIONS
    clean = tmp_path / "clean.jsonl"
    assert main(command(own_server, source, clean)) == 0
    expected = {record["custom_id"]: record for record in records(clean)}
    assert len(expected) == total and all(record["error"] is None for record in expected.values())

    out = tmp_path / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "vllmclient", *command(own_server, source, out)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    revived: LocalServer | None = None
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not (out.exists() and out.read_bytes().count(b"\n") >= CUT_AFTER):
            assert process.poll() is None, f"the job ended before the crash: {process.communicate()}"
            assert time.monotonic() < deadline, "the job wrote nothing"
            time.sleep(0.01)
        crash(own_server)
        _, err = process.communicate(timeout=DEADLINE_S)  # it must end by itself, not hang
        assert process.returncode == 0, err
        first = records(out)
        assert len(first) == total  # one record per line already: done, or failed for a rerun to replace
        failed = [record for record in first if record["error"] is not None]
        assert failed and len(failed) < total - CUT_AFTER + 2
        assert all(record["error"]["retryable"] for record in failed), failed[0]
        assert "run the same command again" in err
        for record in first:
            if record["error"] is None:
                assert texts(record) == texts(expected[record["custom_id"]])

        revived = LocalServer(python=vllm_server_python, port=own_server.port).start()  # the same base_url
        assert main(command(revived, source, out)) == 0
        final = records(out)
        assert len(final) == total and {record["custom_id"] for record in final} == set(expected)
        assert all(record["error"] is None for record in final)
        assert all(texts(record) == texts(expected[record["custom_id"]]) for record in final)
    finally:
        if process.poll() is None:
            process.kill()
        if revived is not None:
            revived.stop()
