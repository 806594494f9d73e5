"""A seeded bulk job cut short by a crash of the real vLLM server resumes from its checkpoint.

Two jobs, one through ``generate`` and one through ``aiter_generate``, run on a server of this module's
own; when both have saved some results, the server's whole process group is SIGKILLed (as a crash or the
OOM killer ends it). Both calls must return soon, with error records for what was unfinished, and a repeat
while the server is still down changes nothing. A new server is started on the same port and the same
calls are repeated with the same clients: only the inputs without a saved result are sent, each checkpoint
ends with exactly one record per input and no error, and every result equals an uninterrupted run with the
same seed. Before that, the same server shows it survives seeded prompts that exceed one step's token
budget (which kills vLLM CPU with chunked prefill on). Two server starts in all; the shared ``vllm_server``
is never used, as tests must not stop it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vllmclient import ClientvLLM, LocalServer
from vllmclient.local_server import _group_alive
from vllmclient.results import GenerateOutput

pytestmark = pytest.mark.integration

COUNT = 48  # inputs per job
SAMPLING: dict[str, Any] = {
    "num_generations": 2, "temperature": 1.0, "seed": 2024, "max_new_tokens": 48, "ignore_eos": True,
}
KILL_AFTER = 4  # results each job has saved when the server is killed: clearly under way, far from done
CALL_DEADLINE_S = 180.0  # a call still running this long after its server died is hung (it takes seconds)
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack"]
TAG = re.compile(r"\[\[([ab]\d+)\]\]")


def job(name: str) -> list[list[dict[str, str]]]:
    """A job's inputs. Each prompt carries its job and index (``[[a7]]``), so what was sent can be told apart,
    and is longer than the one before, so its ``input_tokens`` tell whose result a record is: the tiny model
    barely reads the prompt, and with one seed for the whole job many inputs get the same text.
    """
    return [
        [{"role": "user", "content": f"[[{name}{i}]] Tell me about {', '.join(NAMES[k % 10] for k in range(i + 1))}."}]
        for i in range(COUNT)
    ]


class SentPrompts:
    """A request hook of the user's (``httpx_client_kwargs``): the tag of every prompt the client sends."""

    def __init__(self) -> None:
        self.tags: list[str] = []

    async def hook(self, request: Any) -> None:
        if request.url.path.endswith("/completions"):
            self.tags += [TAG.findall(prompt)[0] for prompt in json.loads(request.content)["prompt"]]


def client(server: LocalServer, sent: SentPrompts) -> ClientvLLM:
    """A job's client. Small retries and timeout: a dead server must give error records within seconds.

    One pack of 2 prompts (x 2 generations) at a time paces the job (~0.3 s a pack here), so the other job,
    started a moment later, catches up to ``KILL_AFTER`` saved results long before this one is done.
    """
    llm = ClientvLLM(
        base_url=server.base_url, tokenizer=str(server.model_dir), max_retries=1, timeout=30,
        max_concurrency=4, pack_size=2, httpx_client_kwargs={"event_hooks": {"request": [sent.hook]}},
    )
    llm.load()
    return llm


def run_generate(llm: ClientvLLM, name: str, checkpoint: Path) -> list[GenerateOutput]:
    return llm.generate(job(name), checkpoint=checkpoint, progress=False, **SAMPLING)


def run_aiter(llm: ClientvLLM, name: str, checkpoint: Path) -> dict[int, GenerateOutput]:
    """``aiter_generate`` consumed from an event loop of the caller's; each index must come once."""

    async def consume(stream: AsyncIterator[tuple[int, GenerateOutput]]) -> dict[int, GenerateOutput]:
        yielded: dict[int, GenerateOutput] = {}
        async for index, output in stream:
            assert index not in yielded, f"aiter_generate yielded input {index} twice"
            yielded[index] = output
        return yielded

    return asyncio.run(consume(llm.aiter_generate(job(name), checkpoint=checkpoint, progress=False, **SAMPLING)))


def sampled(output: GenerateOutput | dict[str, Any]) -> dict[str, Any]:
    """What a seeded run must reproduce (``request_id`` differs from request to request)."""
    return {key: output[key] for key in ("generations", "statistics", "finish_reasons")}


def records(path: Path) -> list[dict[str, Any]]:
    """The checkpoint's result lines (after its header); every line must be whole JSON."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["format"].startswith("vllmclient-checkpoint-")
    return [json.loads(line) for line in lines[1:]]


def saved_count(path: Path) -> int:
    try:
        return path.read_text(encoding="utf-8").count('"index"')
    except FileNotFoundError:
        return 0


def finished_requests(server: LocalServer) -> int:
    """The server's own count of requests it finished (each prompt of a pack is one), from /metrics."""
    with urllib.request.urlopen(server.root_url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    total = sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total{")
    )
    return int(total)


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = target()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def joined(thread: threading.Thread, box: dict[str, Any], what: str) -> Any:
    thread.join(CALL_DEADLINE_S)
    assert not thread.is_alive(), f"{what} still running {CALL_DEADLINE_S:g} s after the server died: it hangs"
    if "error" in box:
        raise box["error"]
    return box["result"]


def crash(server: LocalServer) -> None:
    """SIGKILL the server's whole process group (API server, EngineCore, workers) at once, as a crash would."""
    assert server.pid is not None and os.getpgid(server.pid) == server.pid  # it leads its own group
    os.killpg(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _group_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(server.pid), "the server's process group outlived SIGKILL"
    server.stop()  # only reaps the dead API server


@pytest.fixture(scope="module")
def own_server(vllm_server_python: str) -> Iterator[LocalServer]:
    """This module's server; the resume test kills it, so it runs last."""
    with LocalServer(python=vllm_server_python) as server:
        yield server


def test_seeded_prompts_over_a_step_budget_do_not_kill_the_server(own_server: LocalServer) -> None:
    """vLLM CPU's engine dies ("CPU Generator does not use offset") when a seeded prompt is prefilled in
    chunks, which happens as soon as the prompts arriving together exceed one step's token budget (2,048 on
    CPU): LocalServer turns chunked prefill off. Four ~720-token prompts in one pack, never seen before (no
    prefix cache to shorten them).
    """
    story = "Anna sees the ball in the park every morning. " * 70
    inputs = [[{"role": "user", "content": f"[[s{i}]] {story}"}] for i in range(4)]
    with ClientvLLM(
        base_url=own_server.base_url, tokenizer=str(own_server.model_dir), pack_size=4, max_retries=0
    ) as llm:
        packed = llm.generate(inputs, seed=7, max_new_tokens=8, progress=False)
        assert [output["error"] for output in packed if "error" in output] == []
        assert own_server.running
        assert sum(output["statistics"]["input_tokens"][0] or 0 for output in packed) > 2048
        alone = [llm.generate([conversation], seed=7, max_new_tokens=8)[0] for conversation in inputs]
    assert [sampled(output) for output in packed] == [sampled(output) for output in alone]


def test_a_seeded_job_cut_by_a_server_crash_resumes_to_the_uninterrupted_result(
    own_server: LocalServer, vllm_server_python: str, tmp_path: Path
) -> None:
    path = {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"}
    sent = {"a": SentPrompts(), "b": SentPrompts()}
    server = own_server
    revived: LocalServer | None = None
    llm = {name: client(server, sent[name]) for name in ("a", "b")}
    try:
        # The uninterrupted seeded run, without a checkpoint (and unpaced: the seed makes packing irrelevant).
        with ClientvLLM(base_url=server.base_url, tokenizer=str(server.model_dir), max_retries=1) as plain:
            reference = {name: plain.generate(job(name), progress=False, **SAMPLING) for name in ("a", "b")}
        for name in ("a", "b"):
            assert [output["error"] for output in reference[name] if "error" in output] == []
            counts = [output["statistics"]["input_tokens"][0] or 0 for output in reference[name]]
            assert 0 < counts[0] and counts == sorted(set(counts)), counts  # a record's input is told by its length

        # Both jobs on the same server; kill it once each has saved a few results.
        running = {
            "a": in_thread(lambda: run_generate(llm["a"], "a", path["a"])),
            "b": in_thread(lambda: run_aiter(llm["b"], "b", path["b"])),
        }
        deadline = time.monotonic() + CALL_DEADLINE_S
        while min(saved_count(path["a"]), saved_count(path["b"])) < KILL_AFTER:
            assert time.monotonic() < deadline, "the jobs saved nothing: the server is stuck"
            for name, (thread, box) in running.items():
                if not thread.is_alive():  # too fast for the crash to cut it, or it failed at once
                    outcome = joined(thread, box, f"job {name}")
                    pytest.fail(f"job {name} ended before the crash with {saved_count(path[name])} saved: {outcome}")
            time.sleep(0.002)
        crash(server)
        first = {name: joined(*running[name], f"job {name}") for name in ("a", "b")}

        done: dict[str, list[int]] = {}
        missing: dict[str, list[int]] = {}
        for name in ("a", "b"):
            # Every input came back (generate: a list; aiter_generate: each index once), either done or
            # failed as unreachable, and what is done is what was saved, once each.
            outputs = first[name] if name == "a" else [first[name][index] for index in sorted(first[name])]
            assert len(outputs) == COUNT
            done[name] = [index for index, output in enumerate(outputs) if "error" not in output]
            missing[name] = [index for index, output in enumerate(outputs) if "error" in output]
            assert KILL_AFTER <= len(done[name]) and missing[name], f"job {name} not cut mid-way: {done[name]} done"
            assert {outputs[index]["error"].type for index in missing[name]} == {"ServerUnreachableError"}
            assert all(outputs[index]["generations"] == [None, None] for index in missing[name])
            saved = records(path[name])
            assert sorted(record["index"] for record in saved) == done[name]
            assert all(sampled(outputs[index]) == sampled(reference[name][index]) for index in done[name])

        # Repeated too early, while the server is still down: the unfinished fail again, nothing is saved.
        before = path["a"].read_bytes()
        early = run_generate(llm["a"], "a", path["a"])
        assert [index for index, output in enumerate(early) if "error" in output] == missing["a"]
        assert all(early[index] == first["a"][index] for index in done["a"])  # restored as they were returned
        assert path["a"].read_bytes() == before

        revived = LocalServer(python=vllm_server_python, port=server.port).start()  # the same base_url
        assert finished_requests(revived) == 0

        # The same calls again, with the same clients.
        for name in ("a", "b"):
            sent[name].tags.clear()
        second_a = run_generate(llm["a"], "a", path["a"])
        second_b = run_aiter(llm["b"], "b", path["b"])

        # Only the missing inputs were sent, each once ...
        assert sorted(sent["a"].tags) == sorted(f"a{index}" for index in missing["a"])
        assert sorted(sent["b"].tags) == sorted(f"b{index}" for index in missing["b"])
        # ... and the server generated for nothing else (vLLM counts each of the n=2 sequences as a request).
        assert finished_requests(revived) == SAMPLING["num_generations"] * (len(missing["a"]) + len(missing["b"]))
        # generate returns the whole job, saved and new, equal to the uninterrupted run.
        assert [sampled(output) for output in second_a] == [sampled(output) for output in reference["a"]]
        assert all(second_a[index] == first["a"][index] for index in done["a"])
        # aiter_generate yields only what was missing.
        assert sorted(second_b) == missing["b"]
        assert all(sampled(second_b[index]) == sampled(reference["b"][index]) for index in missing["b"])

        for name in ("a", "b"):
            saved = records(path[name])
            assert sorted(record["index"] for record in saved) == list(range(COUNT)), f"job {name}"
            assert all("error" not in record["output"] for record in saved)
            assert all(sampled(record["output"]) == sampled(reference[name][record["index"]]) for record in saved)

        # Finished: a third call sends nothing.
        for name in ("a", "b"):
            sent[name].tags.clear()
        assert run_generate(llm["a"], "a", path["a"]) == second_a
        assert run_aiter(llm["b"], "b", path["b"]) == {}
        assert sent["a"].tags == sent["b"].tags == []
        assert len(records(path["a"])) == len(records(path["b"])) == COUNT
    finally:
        for each in llm.values():
            each.close()
        if revived is not None:
            revived.stop()
