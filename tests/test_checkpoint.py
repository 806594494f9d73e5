"""Never lose a user's work: a job that stopped (dead server, bad inputs, Ctrl-C) goes on where it stopped."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import threading
import time

import pytest

from vllmclient import ClientvLLM, ConfigurationError
from vllmclient.checkpoint import fingerprint

from fake_vllm import FakeVLLM


def tagged(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"[[q{i}]] tell me something"}] for i in range(count)]


def sent_prompts(server: FakeVLLM) -> list[str]:
    return [prompt for r in server.requests_to("/v1/completions") for prompt in r.body["prompt"]]


def sent_tags(server: FakeVLLM) -> list[str]:
    """The ``[[tag]]`` of each prompt sent, sorted."""
    return sorted(re.findall(r"\[\[(\w+)\]\]", prompt)[0] for prompt in sent_prompts(server))


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
    # refused once it is gone; a request on a connection it closed as it stopped saw that connection drop
    assert {first[i]["error"].type for i in failed} <= {"ServerUnreachableError", "ConnectionLostError"}
    assert any(first[i]["error"].type == "ServerUnreachableError" for i in failed)
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


# -- a refused checkpoint is never written to ---------------------------------------------------------


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_a_refused_checkpoint_is_never_written_to(fake_vllm, tokenizer_dir, tmp_path):
    """The inputs are compared lazily, so results of new inputs come back before a later input is found to
    differ: none of them is saved (it would strand the original job), and aiter_generate yields none."""
    path = tmp_path / "job.jsonl"
    holes = (2, 5, 8)
    for i in holes:
        fake_vllm.fail_prompts_containing(f"[[q{i}]]", message="temporarily refused")
    # One sequence at a time: the result for input 2 is back before input 10 is read.
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, max_concurrency=1, pack_size=1) as llm:
        first = llm.generate(tagged(12), checkpoint=path, max_new_tokens=4)
        assert [i for i, o in enumerate(first) if "error" in o] == list(holes)
        fake_vllm.clear_failures()
        saved = path.read_bytes()
        other = tagged(12)
        for i in (*holes, 10):
            other[i] = user(f"[[x{i}]] something else")

        with pytest.raises(ConfigurationError, match="input 10 differs"):
            llm.generate(other, checkpoint=path, max_new_tokens=4)
        assert path.read_bytes() == saved

        yielded: list[int] = []

        async def consume() -> None:
            async for index, _ in llm.aiter_generate(other, checkpoint=path, max_new_tokens=4):
                yielded.append(index)

        with pytest.raises(ConfigurationError, match="input 10 differs"):
            asyncio.run(consume())
        assert yielded == [] and path.read_bytes() == saved

        fake_vllm.settle()  # the refused calls' requests already on their way land before the count starts
        fake_vllm.clear()  # the original job still resumes: only its failed inputs are sent
        resumed = llm.generate(tagged(12), checkpoint=path, max_new_tokens=4)
        assert sent_tags(fake_vllm) == [f"q{i}" for i in holes]
        assert all(o["generations"][0].startswith(f"q{i}") for i, o in enumerate(resumed))
        fake_vllm.clear()  # the results held back while the inputs were compared were saved in the end
        assert llm.generate(tagged(12), checkpoint=path, max_new_tokens=4) == resumed
        assert sent_prompts(fake_vllm) == []


def test_a_refusal_for_other_parameters_names_what_differs(make_fake_vllm, fake_vllm, tokenizer_dir, tmp_path):
    path = tmp_path / "job.jsonl"
    job = {"max_new_tokens": 4, "temperature": 0.7, "seed": 1}
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        llm.generate(tagged(3), checkpoint=path, **job)
        saved = path.read_bytes()
        for change, message in [
            ({"temperature": 0.9}, r"temperature: saved 0\.7, now 0\.9"),
            ({"max_new_tokens": 5}, r"max_new_tokens: saved 4, now 5"),
            ({"seed": None}, r"seed: saved 1, now not set"),
            ({"num_generations": 2}, r"num_generations: saved 1, now 2"),
            ({"top_k": 5, "extra_body": {"priority": 1}}, r"top_k: saved not set, now 5; priority: saved not set, now 1"),
        ]:
            with pytest.raises(ConfigurationError, match=message):
                llm.generate(tagged(3), checkpoint=path, **{**job, **change})
            assert path.read_bytes() == saved

    copy = tmp_path / "other-tokenizer"
    shutil.copytree(tokenizer_dir, copy)
    with (ClientvLLM(base_url=fake_vllm.base_url, tokenizer=copy) as llm,
          pytest.raises(ConfigurationError, match=rf"tokenizer: saved '{tokenizer_dir}', now '{copy}'")):
        llm.generate(tagged(3), checkpoint=path, **job)
    other = make_fake_vllm(models=[{"id": "other-llama", "max_model_len": 1024}])
    with (ClientvLLM(base_url=other.base_url, tokenizer=tokenizer_dir) as llm,
          pytest.raises(ConfigurationError, match="model: saved 'tiny-llama', now 'other-llama'")):
        llm.generate(tagged(3), checkpoint=path, **job)
    assert path.read_bytes() == saved


def test_template_parameters_rendered_on_the_client_belong_to_the_job(fake_vllm, tokenizer_dir, tmp_path):
    """chat_template_kwargs change the prompts the client renders, though they are not in the request body."""
    path = tmp_path / "job.jsonl"
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        llm.generate(tagged(3), checkpoint=path, max_new_tokens=4, chat_template_kwargs={"enable_thinking": True})
        saved = path.read_bytes()
        with pytest.raises(ConfigurationError, match=r"chat_template_kwargs: saved \{'enable_thinking': True\}, "
                           r"now \{'enable_thinking': False\}"):
            llm.generate(tagged(3), checkpoint=path, max_new_tokens=4, chat_template_kwargs={"enable_thinking": False})
        with pytest.raises(ConfigurationError, match="chat_template_kwargs: saved .*, now not set"):
            llm.generate(tagged(3), checkpoint=path, max_new_tokens=4)
        assert path.read_bytes() == saved
        fake_vllm.clear()
        llm.generate(tagged(3), checkpoint=path, max_new_tokens=4, chat_template_kwargs={"enable_thinking": True})
        assert sent_prompts(fake_vllm) == []


def test_equal_parameters_written_differently_are_the_same_job(fake_vllm, tokenizer_dir, tmp_path, monkeypatch):
    path = tmp_path / "job.jsonl"
    monkeypatch.chdir(tokenizer_dir.parent)
    name = tokenizer_dir.name
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=name) as llm:
        llm.generate(tagged(3), checkpoint=path, max_new_tokens=4, temperature=1, top_p=1, logit_bias={"5": -1})
    for tokenizer in (f"./{name}", f"{name}/", str(tokenizer_dir), tokenizer_dir, f"{tokenizer_dir}/"):
        fake_vllm.clear()
        with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer) as llm:
            outputs = llm.generate(tagged(3), checkpoint=path, max_new_tokens=4, temperature=1.0, top_p=1.0,
                                   logit_bias={"5": -1.0}, frequency_penalty=0)
        assert sent_prompts(fake_vllm) == [], tokenizer
        assert all(o["generations"][0].startswith(f"q{i}") for i, o in enumerate(outputs))


# -- every failure is ours: paths, garbled files, write errors --------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "parent is a file", "device", "name too long"])
def test_a_path_that_cannot_hold_a_checkpoint_is_a_clear_error(fake_vllm, tokenizer_dir, tmp_path, kind):
    if kind == "directory":
        path, fix = tmp_path, "is a directory"
    elif kind == "parent is a file":
        (tmp_path / "notes.txt").write_text("hello\n")
        path, fix = tmp_path / "notes.txt" / "job.jsonl", "cannot"
    elif kind == "device":
        path, fix = os.devnull, "not a regular file"
    else:  # any other error of the OS (permission denied, ...) takes the same way
        path, fix = tmp_path / ("x" * 300), "File name too long"
    with (ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm,
          pytest.raises(ConfigurationError, match=fix) as info):
        llm.generate(tagged(2), checkpoint=path, max_new_tokens=4)
    assert str(path) in str(info.value) and "checkpoint" in str(info.value)
    assert fake_vllm.requests_to("/v1/completions") == []  # found before any work


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00garbage\x00\n", "not a vllmclient checkpoint"),
        (b'{"format": "vllmclient-checkpoint-99", "parameters": {}}\n', "newer version of vllmclient"),
        (b'{"format": "vllmclient-checkpoint-2", "parameters": 7}\n', "header is damaged"),
        (b"[1, 2, 3]\n", "not a vllmclient checkpoint"),
    ],
    ids=["binary", "newer-format", "damaged-header", "json-not-a-header"],
)
def test_a_file_that_is_not_a_readable_checkpoint_is_refused_and_left_alone(
    fake_vllm, tokenizer_dir, tmp_path, content, message
):
    path = tmp_path / "job.jsonl"
    path.write_bytes(content)
    with (ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm,
          pytest.raises(ConfigurationError, match=message) as info):
        llm.generate(tagged(2), checkpoint=path, max_new_tokens=4)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content


def test_damaged_result_lines_are_redone(fake_vllm, tokenizer_dir, tmp_path):
    path = tmp_path / "job.jsonl"
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, pack_size=1) as llm:
        llm.generate(tagged(4), checkpoint=path, max_new_tokens=4)
        header, *lines = path.read_text().splitlines()
        by_index = {json.loads(line)["index"]: line for line in lines}
        damaged = [
            json.dumps({"index": 1}),  # no key, no output
            json.dumps({"index": "2", "key": json.loads(by_index[2])["key"], "output": {}}),
            "\xff not json",
        ]
        path.write_text("\n".join([header, by_index[0], *damaged, by_index[3]]) + "\n")
        fake_vllm.clear()
        outputs = llm.generate(tagged(4), checkpoint=path, max_new_tokens=4)
    assert sent_tags(fake_vllm) == ["q1", "q2"]
    assert all(o["generations"][0].startswith(f"q{i}") for i, o in enumerate(outputs))


def test_a_write_that_fails_is_a_clear_error_and_keeps_what_was_saved(fake_vllm, tokenizer_dir, tmp_path):
    """A full disk (here: the process's file-size limit) stops the job with our error; a resume goes on."""
    resource = pytest.importorskip("resource")
    path = tmp_path / "job.jsonl"
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        llm.generate(tagged(3), checkpoint=path, max_new_tokens=4)
        saved = path.read_bytes()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(saved), hard))
        try:
            with pytest.raises(ConfigurationError, match="could not write") as info:
                llm.generate(tagged(6), checkpoint=path, max_new_tokens=4)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)
        assert str(path) in str(info.value)
        assert path.read_bytes() == saved
        fake_vllm.clear()
        outputs = llm.generate(tagged(6), checkpoint=path, max_new_tokens=4)
    assert sent_tags(fake_vllm) == ["q3", "q4", "q5"]
    assert all(o["generations"][0].startswith(f"q{i}") for i, o in enumerate(outputs))


@pytest.mark.asyncio
async def test_a_checkpoint_in_use_by_another_job_is_refused(fake_vllm, tokenizer_dir, tmp_path):
    path = tmp_path / "job.jsonl"
    async with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        running = llm.aiter_generate(tagged(40), checkpoint=path, max_new_tokens=4)
        await running.__anext__()  # the first job is under way, its checkpoint open
        with pytest.raises(ConfigurationError, match="in use"):
            llm.generate(tagged(40), checkpoint=path, max_new_tokens=4)
        async for _ in running:
            pass
        fake_vllm.clear()
        assert len(llm.generate(tagged(40), checkpoint=path, max_new_tokens=4)) == 40
        assert sent_prompts(fake_vllm) == []


def test_a_checkpoint_of_the_first_format_still_resumes(fake_vllm, tokenizer_dir, tmp_path):
    """Files written before the header kept the parameters (format 1: only their fingerprint)."""
    path = tmp_path / "job.jsonl"
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, pack_size=1) as llm:
        llm.generate(tagged(4), checkpoint=path, max_new_tokens=4)
        body = {k: v for k, v in fake_vllm.requests_to("/v1/completions")[-1].body.items() if k != "prompt"}
        identity = {"request": body, "tokenizer": [str(tokenizer_dir), None], "magpie": None}
        lines = path.read_text().splitlines()[1:]
        old = json.dumps({"format": "vllmclient-checkpoint-1", "parameters": fingerprint(identity)})
        path.write_text("\n".join([old, *lines[:2]]) + "\n")
        fake_vllm.clear()
        outputs = llm.generate(tagged(4), checkpoint=path, max_new_tokens=4)
        assert sent_tags(fake_vllm) == ["q2", "q3"]
        assert all(o["generations"][0].startswith(f"q{i}") for i, o in enumerate(outputs))
        with pytest.raises(ConfigurationError, match="older vllmclient.*cannot say which"):
            llm.generate(tagged(4), checkpoint=path, max_new_tokens=5)
