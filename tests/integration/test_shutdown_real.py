"""A real vLLM server told to stop (SIGTERM to its main process, as ``docker stop`` and Kubernetes do) while a
job and a stream run: most often it answers the requests in flight with HTTP 200, finish reason "abort" and the
text so far (measured on vLLM 0.32: 3 runs in 4; else EngineCore's 500, a silence, or it lets them finish). No
cut answer may pass for a finished one: those inputs fail (a checkpointed call sends them again) and the stream
raises instead of ending. One server start."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from vllmclient import ClientvLLM, LocalServer, StreamEnd, TextDelta, VLLMClientError

pytestmark = pytest.mark.integration

FINISHED = {"stop", "length"}
LONG = {"max_new_tokens": 1000, "ignore_eos": True, "temperature": 0}  # far longer than the test lets them run


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_generations_cut_by_a_server_stop_fail_instead_of_passing_as_finished(
    vllm_server_python: str, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "job.jsonl"
    box: dict[str, Any] = {}
    with LocalServer(python=vllm_server_python) as server:
        chat = ClientvLLM(base_url=server.base_url, tokenizer=None, max_retries=0, timeout=20)
        template = ClientvLLM(base_url=server.base_url, tokenizer=server.model_dir, max_retries=0, timeout=20)

        def job() -> None:
            box["outputs"] = template.generate([user(f"Tell me story {i}") for i in range(6)], progress=False,
                                               checkpoint=checkpoint, **LONG)

        template.load()
        worker = threading.Thread(target=job)
        worker.start()
        received: list[Any] = []
        events = chat.stream(user("Tell me a long story"), **LONG)
        for event in events:
            received.append(event)
            if len(received) == 20:
                break  # the job is under way too: it was sent before the stream
        assert server.pid is not None
        os.kill(server.pid, signal.SIGTERM)  # the API server only (LocalServer.stop() signals the whole group)
        try:
            received.extend(events)
        except VLLMClientError:
            pass  # vLLM 0.32's answer varies: "abort" (most often), EngineCore's 500, or silence until the timeout
        else:
            assert isinstance(received[-1], StreamEnd) and received[-1].finish_reason in FINISHED, received[-1]
        worker.join(120)
        assert not worker.is_alive(), "generate still running 120 s after the server stopped"
        chat.close()
        template.close()
    assert all(isinstance(event, TextDelta) for event in received[:-1])
    # each input failed, or finished before the server went (it may let the requests in flight end first)
    outputs = box["outputs"]
    assert all("error" in output or set(output["finish_reasons"]) <= FINISHED for output in outputs), outputs
    saved = checkpoint.read_text() if checkpoint.exists() else ""
    assert '"abort"' not in saved  # nothing cut short was saved as done: a resumed call sends them all again
