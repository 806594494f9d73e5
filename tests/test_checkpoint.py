"""Never lose a user's work: a job that stopped (dead server, bad inputs, Ctrl-C) goes on where it stopped."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from vllmclient import ClientvLLM, ConfigurationError

from fake_vllm import FakeVLLM


def tagged(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"[[q{i}]] tell me something"}] for i in range(count)]


def sent_prompts(server: FakeVLLM) -> list[str]:
    return [prompt for r in server.requests_to("/v1/completions") for prompt in r.body["prompt"]]


def test_resume_after_the_server_died_sends_only_what_is_missing(tokenizer_dir, tmp_path):
    path = tmp_path / "job.jsonl"
    server = FakeVLLM(tokenizer_dir, latency=0.05).start()
    port = server.port
    llm = ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir, max_retries=0, max_concurrency=4, pack_size=2)

    def kill_when_some_are_done() -> None:
        deadline = time.monotonic() + 10
        while server.completion_requests < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.stop()

    killer = threading.Thread(target=kill_when_some_are_done)
    killer.start()
    first = llm.generate(tagged(40), checkpoint=path, max_new_tokens=4, seed=1)
    killer.join()
    succeeded = [i for i, output in enumerate(first) if "error" not in output]
    failed = [i for i, output in enumerate(first) if "error" in output]
    assert succeeded and failed
    assert all(first[i]["error"].type == "ServerUnreachableError" for i in failed)
    saved = path.read_text().splitlines()
    assert len(saved) == 1 + len(succeeded)  # a header, then one line per finished input

    revived = FakeVLLM(tokenizer_dir, port=port).start()
    try:
        second = llm.generate(tagged(40), checkpoint=path, max_new_tokens=4, seed=1)
        resent = sent_prompts(revived)
        assert len(resent) == len(failed)
        assert all(f"[[q{i}]]" in prompt for i, prompt in zip(failed, resent, strict=True))
        assert [o["generations"] for i, o in enumerate(second) if i in succeeded] == [
            first[i]["generations"] for i in succeeded
        ]
        assert all("error" not in output and output["generations"][0].startswith(f"q{i}")
                   for i, output in enumerate(second))
        # Done: a third run sends nothing at all.
        revived.clear()
        third = llm.generate(tagged(40), checkpoint=path, max_new_tokens=4, seed=1)
        assert sent_prompts(revived) == [] and third == second
    finally:
        llm.close()
        revived.stop()


def test_failed_inputs_are_retried_on_resume(fake_vllm, tokenizer_dir, tmp_path):
    path = tmp_path / "job.jsonl"
    fake_vllm.fail_prompts_containing("[[q3]]", message="temporarily refused")
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        first = llm.generate(tagged(8), checkpoint=path, max_new_tokens=4)
        assert [i for i, o in enumerate(first) if "error" in o] == [3]
        fake_vllm.clear_failures()
        fake_vllm.clear()
        second = llm.generate(tagged(8), checkpoint=path, max_new_tokens=4)
    assert len(sent_prompts(fake_vllm)) == 1 and "[[q3]]" in sent_prompts(fake_vllm)[0]
    assert all("error" not in o for o in second)


def test_a_line_cut_short_by_a_crash_is_redone(fake_vllm, tokenizer_dir, tmp_path):
    path = tmp_path / "job.jsonl"
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, pack_size=1) as llm:
        llm.generate(tagged(5), checkpoint=path, max_new_tokens=4)
        lines = path.read_text().splitlines()
        cut = json.loads(lines[-1])["index"]
        path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
        fake_vllm.clear()
        outputs = llm.generate(tagged(5), checkpoint=path, max_new_tokens=4)
        assert len(sent_prompts(fake_vllm)) == 1 and f"[[q{cut}]]" in sent_prompts(fake_vllm)[0]
        assert all(o["generations"][0].startswith(f"q{i}") for i, o in enumerate(outputs))
        fake_vllm.clear()  # the redone result went on a line of its own: nothing is redone again
        llm.generate(tagged(5), checkpoint=path, max_new_tokens=4)
        assert sent_prompts(fake_vllm) == []


def test_an_empty_file_is_a_new_checkpoint(fake_vllm, tokenizer_dir, tmp_path):
    path = tmp_path / "job.jsonl"
    path.touch()
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        assert all("error" not in o for o in llm.generate(tagged(3), checkpoint=path, max_new_tokens=4))
    assert len(path.read_text().splitlines()) == 4


def test_a_checkpoint_of_other_inputs_or_parameters_is_refused(fake_vllm, tokenizer_dir, tmp_path):
    path = tmp_path / "job.jsonl"
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        llm.generate(tagged(4), checkpoint=path, max_new_tokens=4)
        with pytest.raises(ConfigurationError, match="input 0 differs"):
            llm.generate(list(reversed(tagged(4))), checkpoint=path, max_new_tokens=4)
        with pytest.raises(ConfigurationError, match="other generation parameters"):
            llm.generate(tagged(4), checkpoint=path, max_new_tokens=5)
        (tmp_path / "notes.txt").write_text("hello\n")
        with pytest.raises(ConfigurationError, match="not a vllmclient checkpoint"):
            llm.generate(tagged(4), checkpoint=tmp_path / "notes.txt", max_new_tokens=4)


def test_aiter_generate_with_a_checkpoint_yields_only_new_results(fake_vllm, tokenizer_dir, tmp_path):
    path = tmp_path / "job.jsonl"

    async def run(count: int) -> list[int]:
        return [index async for index, _ in llm.aiter_generate(tagged(count), checkpoint=path, max_new_tokens=4)]

    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        assert sorted(asyncio.run(run(5))) == [0, 1, 2, 3, 4]
        assert sorted(asyncio.run(run(8))) == [5, 6, 7]  # the job grew: only the new inputs are sent
    assert len(sent_prompts(fake_vllm)) == 8
