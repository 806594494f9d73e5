"""Job files (``vllmclient run`` / ``run_batch_file``) against the fake vLLM server over HTTP.

Input: batch lines for /v1/chat/completions and /v1/completions, plain lines; output: one run_batch record
per line, its body what the server answers the line sent alone; bad lines fail alone; resume by custom_id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from vllmclient import ClientvLLM, ConfigurationError, run_batch_file
from vllmclient.cli import main

MODEL = "tiny-llama"


def chat_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": text}], **body}}


def completion_line(custom_id: str, prompt: Any, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": prompt, **body}}


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(path: Path) -> dict[str, dict[str, Any]]:
    found = records(path)
    ids = [record["custom_id"] for record in found]
    assert len(ids) == len(set(ids)), f"duplicate records: {sorted(i for i in ids if ids.count(i) > 1)}"
    return {record["custom_id"]: record for record in found}


def texts(record: dict[str, Any]) -> list[str]:
    body = record["response"]["body"]
    return [choice["message"]["content"] if "message" in choice else choice["text"] for choice in body["choices"]]


def alone(server: Any, line: dict[str, Any]) -> dict[str, Any]:
    """What the server answers this line's body sent by itself."""
    request = urllib.request.Request(server.base_url + line["url"], data=json.dumps(line["body"]).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def as_sent(llm: ClientvLLM, line: dict[str, Any]) -> dict[str, Any]:
    """The line as the server gets it alone: a chat line the client renders is the completion of its prompt."""
    if line["url"] == "/v1/completions" or llm.tokenizer is None:
        return line
    body = dict(line["body"])
    prompt = llm._formatter.render(body.pop("messages"), None)  # type: ignore[union-attr]
    body.update(prompt=prompt, add_special_tokens=False)
    if body.pop("logprobs", False):
        body["logprobs"] = body.pop("top_logprobs")
    return {"url": "/v1/completions", "body": body}


def tokens(logprobs: dict[str, Any]) -> list[str]:
    return [p["token"] for p in logprobs["content"]] if "content" in logprobs else logprobs["tokens"]


@pytest.fixture
def client(fake_vllm: Any, tokenizer_dir: Path) -> Any:
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=str(tokenizer_dir), max_retries=0) as llm:
        yield llm


@pytest.fixture
def chat_client(fake_vllm: Any) -> Any:
    with ClientvLLM(base_url=fake_vllm.base_url, max_retries=0) as llm:
        yield llm


@pytest.mark.parametrize("mode", ["tokenizer", "chat"])
def test_each_record_is_what_the_server_answers_the_line_alone(mode, request, fake_vllm, tmp_path):
    llm = request.getfixturevalue("client" if mode == "tokenizer" else "chat_client")
    lines = []
    for i in range(6):
        lines.append(completion_line(f"p{i}", f"Once upon a time {i}", max_tokens=12, seed=i, logprobs=2,
                                     return_token_ids=i % 2 == 0))
        lines.append(chat_line(f"c{i}", f"Tell me about {i}", max_tokens=10, seed=i, n=2, temperature=0.9,
                               logprobs=True, top_logprobs=2))
    for i in range(5):  # the same body: packed, n choices per prompt, cut apart per line
        lines.append(completion_line(f"s{i}", f"Shared body {i}", max_tokens=6, seed=99, n=2, logprobs=1))
        lines.append(chat_line(f"t{i}", f"Shared chat {i}", max_tokens=6, seed=99, n=2, temperature=0.8))
    source = write_lines(tmp_path / "in.jsonl", lines)
    summary = run_batch_file(llm, source, tmp_path / "out.jsonl", progress=False)
    assert (summary.inputs, summary.done, summary.failed) == (22, 22, {})
    got = by_id(tmp_path / "out.jsonl")
    assert set(got) == {line["custom_id"] for line in lines}
    completions = fake_vllm.requests_to("/v1/completions")
    chats = len(fake_vllm.requests_to("/v1/chat/completions"))  # each seed its own group, the shared ones packed
    assert (len(completions), chats) == ((14, 0) if mode == "tokenizer" else (7, 11))
    assert any(len(r.body["prompt"]) == 5 and r.body["n"] == 2 for r in completions)
    for line in lines:
        record = got[line["custom_id"]]
        assert record["error"] is None and record["response"]["status_code"] == 200
        body, expected = record["response"]["body"], alone(fake_vllm, as_sent(llm, line))
        assert body["object"] == ("chat.completion" if line["url"].endswith("chat/completions") else "text_completion")
        assert body["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
        assert body["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]
        assert texts(record) == texts({"response": {"body": expected}})
        for mine, theirs in zip(body["choices"], expected["choices"], strict=True):
            assert mine["index"] == theirs["index"] and mine["finish_reason"] == theirs["finish_reason"]
            if line["url"] == "/v1/completions":
                assert mine["logprobs"] == theirs["logprobs"]
                assert mine["token_ids"] == theirs["token_ids"]  # only when the line asked for them
            elif "logprobs" in line["body"]:
                assert [p["token"] for p in mine["logprobs"]["content"]] == tokens(theirs["logprobs"])
            else:
                assert mine["logprobs"] is None
        assert set(expected) <= set(body), "a field of the server's answer is missing"
        assert set(expected["choices"][0]) - {"text"} <= set(body["choices"][0]) | {"prompt_logprobs",
                                                                                     "prompt_token_ids"}


def test_lines_whose_bodies_differ_only_in_the_prompt_are_packed(client, fake_vllm, tmp_path):
    lines = [completion_line(f"a{i}", f"alpha {i}", max_tokens=4, seed=1) for i in range(40)]
    lines += [completion_line(f"b{i}", f"beta {i}", max_tokens=5, seed=1) for i in range(40)]
    lines += [[{"role": "user", "content": f"plain {i}"}] for i in range(40)]
    run_batch_file(client, write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", progress=False,
                   max_new_tokens=3)
    assert len(by_id(tmp_path / "out.jsonl")) == 120
    sent = fake_vllm.requests_to("/v1/completions")
    assert len(sent) < 30, f"{len(sent)} requests for 120 lines: not packed"
    for recorded in sent:  # a pack never mixes bodies
        prompts = recorded.body["prompt"]
        kinds = {prompt.split()[0] if not prompt.startswith("<") else "plain" for prompt in prompts}
        assert len(kinds) == 1, prompts
        expected = {"alpha": 4, "beta": 5, "plain": 3}[kinds.pop()]
        assert recorded.body["max_tokens"] == expected


def test_bad_lines_and_failed_requests_become_error_records_naming_their_line(client, fake_vllm, tmp_path):
    fake_vllm.fail_prompts_containing("POISON", status=400, message="this prompt is refused")
    lines: list[Any] = [completion_line(f"p{i}", f"fine {i}", max_tokens=4) for i in range(10)]
    lines[3] = completion_line("p3", "POISON here", max_tokens=4)
    lines += [
        "{not json",  # line 11
        completion_line("p0", "again", max_tokens=4),  # 12: duplicate custom_id
        {"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {"prompt": "a"}},  # 13
        {"custom_id": "y", "method": "POST", "url": "/v1/embeddings", "body": {"input": "a"}},  # 14
        completion_line("z1", "a", max_tokens=4, stream=True),  # 15
        completion_line("z2", "a", max_tokens=4, temprature=0.5),  # 16: not a vLLM field
        completion_line("z3", "a", max_tokens=4, temperature=7),  # 17: out of range
        completion_line("z4", ["a", "b"], max_tokens=4),  # 18: two prompts on one line
        chat_line("z5", "a", max_tokens=4, request_id="mine"),  # 19
        {"custom_id": "z6", "messages": [{"role": "nobody", "content": "a"}]},  # 20
        "42",  # 21
    ]
    source = write_lines(tmp_path / "in.jsonl", lines)
    summary = run_batch_file(client, source, tmp_path / "out.jsonl", progress=False)
    got = records(tmp_path / "out.jsonl")
    assert len(got) == len(lines) == summary.inputs
    failed = {record["error"]["line"]: record for record in got if record["error"] is not None}
    assert sorted(failed) == [4, *range(11, 22)]
    assert all(record["error"]["message"].startswith(f"line {number}") for number, record in failed.items())
    assert failed[4]["error"]["code"] == 400 and "refused" in failed[4]["error"]["message"]
    assert failed[4]["custom_id"] == "p3" and failed[12]["custom_id"] == "p0"
    assert failed[12]["error"]["type"] == "DuplicateCustomIdError"
    assert failed[11]["custom_id"] == "line-11" and failed[11]["error"]["type"] == "InvalidLineError"
    for number, words in {13: "method", 14: "url", 15: "stream", 16: "temprature", 17: "temperature",
                          18: "one prompt per line", 19: "request_id", 20: "role", 21: "JSON object"}.items():
        assert words in failed[number]["error"]["message"], failed[number]["error"]
    assert not any(record["error"]["retryable"] for record in failed.values())
    assert sum(record["error"] is None for record in got) == 9
    assert summary.done == 9 and sum(summary.failed.values()) == 12 and summary.retryable == 0
    # Lasting failures are kept: a rerun adds nothing, sends nothing (the duplicate stays the duplicate).
    before = (tmp_path / "out.jsonl").read_bytes()
    fake_vllm.clear()
    again = run_batch_file(client, source, tmp_path / "out.jsonl", progress=False)
    assert (again.already_done, again.done, again.failed) == (len(lines), 0, {})
    assert (tmp_path / "out.jsonl").read_bytes() == before and fake_vllm.requests_to("/v1/completions") == []


def test_a_custom_id_is_taken_by_its_first_line_even_when_that_line_is_invalid(client, fake_vllm, tmp_path):
    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m"}},  # no prompt
             completion_line("a", "hello"), completion_line("line-4", "x"), {"messages": [{"role": "user",
                                                                                           "content": "y"}]}]
    run_batch_file(client, write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", progress=False)
    got = {record["error"]["line"]: record["error"]["type"] for record in records(tmp_path / "out.jsonl")
           if record["error"] is not None}
    assert got == {1: "InvalidLineError", 2: "DuplicateCustomIdError", 4: "DuplicateCustomIdError"}
    assert len(records(tmp_path / "out.jsonl")) == 4


def test_sampling_options_that_batch_lines_do_not_take_are_warned_about(client, fake_vllm, tmp_path, caplog):
    lines = [completion_line("a", "hello"), chat_line("b", "hi")]
    source = write_lines(tmp_path / "in.jsonl", lines)
    with caplog.at_level("WARNING", logger="vllmclient"):
        run_batch_file(client, source, tmp_path / "out.jsonl", progress=False, temperature=0.5)
    warned = [r.getMessage() for r in caplog.records if "plain lines" in r.getMessage()]
    assert len(warned) == 1 and "temperature" in warned[0] and "2 batch lines" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllmclient"):
        run_batch_file(client, write_lines(tmp_path / "in2.jsonl", lines), tmp_path / "out2.jsonl", progress=False)
    assert not [r for r in caplog.records if "plain lines" in r.getMessage()]


def test_fields_a_line_leaves_out_are_not_sent(client, fake_vllm, tmp_path):
    lines = [completion_line("a", "hello"), chat_line("b", "hello")]
    run_batch_file(client, write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", progress=False)
    for recorded in fake_vllm.requests_to("/v1/completions"):
        for name in ("max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty"):
            assert name not in recorded.body
    line_prompt = next(r for r in fake_vllm.requests_to("/v1/completions") if r.body["prompt"] == ["hello"])
    assert "add_special_tokens" not in line_prompt.body  # the server adds BOS to a line's raw prompt, as alone


def test_a_chat_line_with_tools_goes_to_the_servers_chat_path_the_others_are_packed(client, fake_vllm, tmp_path):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    lines = [chat_line("t", "find it", max_tokens=5, tools=[tool], tool_choice="auto"),
             chat_line("a", "one", max_tokens=5), chat_line("b", "two", max_tokens=5)]
    run_batch_file(client, write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", progress=False)
    got = by_id(tmp_path / "out.jsonl")
    assert got["t"]["response"]["body"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert len(fake_vllm.requests_to("/v1/chat/completions")) == 1
    (packed,) = fake_vllm.requests_to("/v1/completions")  # the other two, rendered with the template, together
    assert len(packed.body["prompt"]) == 2 and all(p.endswith("\n\n") for p in packed.body["prompt"])
    assert got["a"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"


def test_a_rerun_sends_nothing_for_lines_already_recorded(client, fake_vllm, tmp_path):
    lines = [completion_line(f"p{i}", f"x {i}", max_tokens=3) for i in range(20)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    run_batch_file(client, source, tmp_path / "out.jsonl", progress=False)
    first = (tmp_path / "out.jsonl").read_bytes()
    fake_vllm.clear()
    summary = run_batch_file(client, source, tmp_path / "out.jsonl", progress=False)
    assert (summary.already_done, summary.done) == (20, 0)
    assert fake_vllm.requests_to("/v1/completions") == []
    assert (tmp_path / "out.jsonl").read_bytes() == first


def test_a_job_resumes_on_another_server_and_concurrency(client, fake_vllm, make_fake_vllm, tokenizer_dir, tmp_path):
    lines = [completion_line(f"p{i}", f"x {i}", max_tokens=3 + (i == 7), seed=5) for i in range(10)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    fake_vllm.fail_next(503, times=100, match="x 7")  # line 8 (its own pack) fails for good on this server
    run_batch_file(client, source, out, progress=False)
    other = make_fake_vllm()
    with ClientvLLM(base_url=other.base_url, tokenizer=str(tokenizer_dir), max_concurrency=3) as moved:
        summary = run_batch_file(moved, source, out, progress=False)
    assert (summary.already_done, summary.done) == (9, 1)
    assert [r.body["prompt"] for r in other.requests_to("/v1/completions")] == [["x 7"]]
    assert all(record["error"] is None for record in by_id(out).values())


def test_a_torn_last_line_is_repaired_and_its_line_run_again(client, fake_vllm, tmp_path):
    lines = [completion_line(f"p{i}", f"x {i}", max_tokens=3, seed=5) for i in range(10)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    run_batch_file(client, source, out, progress=False)
    whole = by_id(out)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 40])  # the last record cut short, as by a kill mid-write
    torn = json.loads(data.splitlines()[-1])["custom_id"]
    fake_vllm.clear()
    summary = run_batch_file(client, source, out, progress=False)
    assert (summary.already_done, summary.done) == (9, 1)
    again = by_id(out)
    assert set(again) == set(whole)
    assert texts(again[torn]) == texts(whole[torn])


def test_transient_failures_are_run_again_and_replaced_lasting_ones_kept(client, fake_vllm, tmp_path):
    lines = [completion_line(f"p{i}", f"x {i}", max_tokens=3, seed=5) for i in range(8)]
    lines.append(completion_line("bad", "x", max_tokens=3, temperature=9))
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    fake_vllm.fail_next(503, times=100)  # every request of the first run
    first = run_batch_file(client, source, out, progress=False)
    assert first.done == 0 and first.retryable == 8 and first.failed == {"ServerError": 8, "InvalidInputError": 1}
    assert sum(record["error"]["retryable"] for record in records(out)) == 8  # one record per line meanwhile
    fake_vllm.clear_failures()
    second = run_batch_file(client, source, out, progress=False)
    assert (second.already_done, second.done, second.failed) == (1, 8, {})
    got = by_id(out)
    assert len(got) == 9 and got["bad"]["error"]["type"] == "InvalidInputError"
    assert all(got[f"p{i}"]["error"] is None for i in range(8))


@pytest.mark.parametrize("change", ["input", "options"])
def test_an_output_written_for_another_job_is_refused_and_left_as_it_is(change, client, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [completion_line(f"p{i}", f"x {i}") for i in range(3)])
    out = tmp_path / "out.jsonl"
    run_batch_file(client, source, out, progress=False, max_new_tokens=4)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    params = {"max_new_tokens": 4}
    if change == "input":
        other = write_lines(tmp_path / "other.jsonl", [completion_line("q", "y")])
        before["other.jsonl"] = other.read_bytes()
        source = other
    else:
        params = {"max_new_tokens": 5}
    with pytest.raises(ConfigurationError, match="another job") as info:
        run_batch_file(client, source, out, progress=False, **params)
    assert ("input file" in str(info.value)) == (change == "input")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_an_output_deleted_to_start_over_may_start_another_job(client, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [completion_line("p", "x")])
    out = tmp_path / "out.jsonl"
    run_batch_file(client, source, out, progress=False, max_new_tokens=4)
    out.unlink()  # its .job.json stays behind
    summary = run_batch_file(client, source, out, progress=False, max_new_tokens=5)
    assert summary.done == 1 and '"max_new_tokens": 5' in (tmp_path / "out.jsonl.job.json").read_text()
    with pytest.raises(ConfigurationError, match="another job"):
        run_batch_file(client, source, out, progress=False, max_new_tokens=4)


def test_an_output_no_job_wrote_is_refused_and_left_as_it_is(client, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [completion_line("p", "x")])
    out = tmp_path / "out.jsonl"
    out.write_text("my own notes\n")
    with pytest.raises(ConfigurationError, match="no `vllmclient run` wrote"):
        run_batch_file(client, source, out, progress=False)
    assert out.read_text() == "my own notes\n"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # nothing left beside it either


def test_the_command_line_runs_a_job_and_writes_its_summary(fake_vllm, tokenizer_dir, tmp_path, capsys):
    lines = [{"custom_id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(7)]
    lines.append("{broken")
    source = write_lines(tmp_path / "in.jsonl", lines)
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    argv = ["run", str(source), "-o", str(out), "--base-url", fake_vllm.base_url, "--tokenizer", str(tokenizer_dir),
            "--max-tokens", "6", "--temperature", "0.5", "--seed", "3", "--n", "2", "--summary-json", str(summary),
            "--no-progress"]
    assert main(argv) == 0
    got = by_id(out)
    assert len(got) == 8 and all(len(texts(got[f"q{i}"])) == 2 for i in range(7))
    sent = fake_vllm.requests_to("/v1/completions")
    assert all(r.body["max_tokens"] == 6 and r.body["seed"] == 3 and r.body["n"] == 2 for r in sent)
    data = json.loads(summary.read_text())
    assert (data["inputs"], data["done"], data["failed"]) == (8, 7, {"InvalidLineError": 1})
    assert data["output_tokens"] == sum(got[f"q{i}"]["response"]["body"]["usage"]["completion_tokens"]
                                        for i in range(7)) > 0
    assert data["prompts_per_second"] > 0 and data["seconds"] > 0
    err = capsys.readouterr().err
    assert "8 inputs" in err and "InvalidLineError 1" in err


def test_serve_is_the_local_server_launcher(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    assert "--max-model-len" in capsys.readouterr().out


def test_the_output_file_holds_only_run_batch_records(client, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [completion_line("p", "x"), "{bad"])
    out = tmp_path / "out.jsonl"
    run_batch_file(client, source, out, progress=False)
    for record in records(out):
        assert set(record) == {"id", "custom_id", "response", "error"}
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl", "out.jsonl.job.json"]


# -- the command line stopped mid-job, in a real subprocess ----------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _cli(fake: Any, tokenizer_dir: Path, source: Path, out: Path) -> list[str]:
    return ["run", str(source), "-o", str(out), "--base-url", fake.base_url, "--tokenizer", str(tokenizer_dir),
            "--max-concurrency", "4", "--max-tokens", "8", "--seed", "11", "--no-progress"]


def _wait_for_lines(out: Path, count: int, process: subprocess.Popen[str], deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if out.exists() and out.read_bytes().count(b"\n") >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"the job ended before it was stopped: {process.communicate()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("the job wrote nothing within a minute")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_job_stopped_mid_way_ends_after_a_rerun_with_one_record_per_line_as_if_never_stopped(
    stop, make_fake_vllm, tokenizer_dir, tmp_path, capsys
):
    fake = make_fake_vllm(latency=0.05)
    lines = [{"custom_id": f"q{i}", "messages": [{"role": "user", "content": f"question number {i}"}]}
             for i in range(240)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    clean = tmp_path / "clean.jsonl"
    assert main(_cli(fake, tokenizer_dir, source, clean)) == 0
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "vllmclient", *_cli(fake, tokenizer_dir, source, out)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, 20, process)
    process.send_signal(stop)
    started = time.monotonic()
    _, err = process.communicate(timeout=30)
    if stop == signal.SIGINT:
        assert process.returncode == 130 and time.monotonic() - started < 10
        assert "Run the same command again to resume" in err
    else:
        assert process.returncode == -signal.SIGKILL
    written = records(out) if out.read_bytes().endswith(b"\n") else None
    assert written is None or 20 <= len(written) < 240, "stopped too late to test anything"
    assert main(_cli(fake, tokenizer_dir, source, out)) == 0
    got, expected = by_id(out), by_id(clean)
    assert set(got) == set(expected) and len(records(out)) == 240
    assert all(got[key]["error"] is None and texts(got[key]) == texts(expected[key]) for key in expected)


def test_the_console_scripts_name_the_command_line_and_the_launcher():
    import configparser
    import importlib

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].strip().splitlines())
    assert scripts == {"vllmclient": "vllmclient.cli:main", "vllmclient-server": "vllmclient.cli:serve"}
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_the_api_key_comes_from_a_file_never_the_command_line(make_fake_vllm, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    fake = make_fake_vllm(api_key="sk-job-S3CRET")
    source = write_lines(tmp_path / "in.jsonl", [completion_line("p", "x", max_tokens=3)])
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", fake.base_url, "--no-progress"]
    assert main(argv) == 1  # no key: refused by the server before anything is written
    assert "API key" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()
    (tmp_path / "key").write_text("sk-job-S3CRET\n")
    assert main([*argv, "--api-key-file", str(tmp_path / "key")]) == 0
    assert by_id(tmp_path / "out.jsonl")["p"]["error"] is None
    assert "S3CRET" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([*argv, "--api-key", "sk-job-S3CRET"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--api-key-file" in err and "S3CRET" not in err


SENT_AS = [  # (line, what the server must get in the request carrying it)
    (chat_line("a", "x", max_completion_tokens=7), {"max_tokens": 7}),
    (chat_line("b", "x", max_tokens=7, max_completion_tokens=7), {"max_tokens": 7}),
    (chat_line("c", "x", max_tokens=5, logprobs=True), {"logprobs": 0}),
    (chat_line("d", "x", max_tokens=5, logprobs=False, top_logprobs=0, stream=False), {"max_tokens": 5}),
    (completion_line("e", "x", max_tokens=5, echo=False, add_special_tokens=True), {"add_special_tokens": True}),
    (completion_line("f", [5, 6, 7], max_tokens=5), {"prompt": [[5, 6, 7]]}),
    (completion_line("g", ["just one"], max_tokens=5, user="me", top_k=3), {"prompt": ["just one"], "user": "me",
                                                                          "top_k": 3}),
]
REFUSED = [
    (chat_line("h", "x", max_tokens=5, max_completion_tokens=6), "disagree"),
    (chat_line("i", "x", top_logprobs=2), "top_logprobs needs logprobs"),
    (chat_line("j", "x", logprobs=3), "true or false"),
    (chat_line("k", "x", suffix="no"), "'suffix'"),
    (completion_line("l", "x", chat_template_kwargs={"a": 1}), "'chat_template_kwargs'"),
    (completion_line("m", "x", top_logprobs=1), "'top_logprobs'"),
    (completion_line("n", "x", echo=True), "echo"),
    (completion_line("o", [1, "a"]), "token ids"),
    (completion_line("p", "x", guided_regex="a+"), "guided"),
    (completion_line("q", "x", max_tokens=5, n=0), "n=0 is invalid"),  # named as the line wrote it
]


def test_each_body_field_is_sent_as_vllm_reads_it_or_fails_its_line(client, fake_vllm, tmp_path):
    lines = [line for line, _ in SENT_AS] + [line for line, _ in REFUSED]
    run_batch_file(client, write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", progress=False)
    got = by_id(tmp_path / "out.jsonl")
    sent = fake_vllm.requests_to("/v1/completions")
    for line, fields in SENT_AS:
        assert got[line["custom_id"]]["error"] is None, got[line["custom_id"]]["error"]
        carrying = [r.body for r in sent if all(r.body.get(name) == value for name, value in fields.items())]
        assert carrying, f"{line['custom_id']}: no request carried {fields}"
    for line, words in REFUSED:
        error = got[line["custom_id"]]["error"]
        assert error is not None and words in error["message"], (line["custom_id"], error)
        assert error["type"] == "InvalidInputError" and not error["retryable"]


def test_a_server_down_from_the_start_fails_the_command_and_writes_nothing(tmp_path, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    source = write_lines(tmp_path / "in.jsonl", [completion_line("p", "x")])
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", f"http://127.0.0.1:{port}",
            "--max-retries", "0", "--no-progress"]
    assert main(argv) == 1
    assert "connect" in capsys.readouterr().err.lower()
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_a_chat_job_sends_its_conversations_alone_never_packed_through_the_batch_endpoint(chat_client, fake_vllm,
                                                                                          tmp_path):
    """A record is the server's answer to its line alone; a /v1/chat/completions/batch answer sums usage over its
    conversations and has no prompt token ids, so it cannot be cut into that: a job never packs conversations."""
    lines = [chat_line(f"t{i}", f"Shared chat {i} " + "word " * i, max_tokens=6, seed=5) for i in range(6)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    summary = run_batch_file(chat_client, source, tmp_path / "out.jsonl", progress=False)
    assert (summary.inputs, summary.done, summary.failed) == (6, 6, {})
    assert not fake_vllm.requests_to("/v1/chat/completions/batch")
    got = by_id(tmp_path / "out.jsonl")
    for line in lines:
        body, expected = got[line["custom_id"]]["response"]["body"], alone(fake_vllm, line)
        assert body["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
        assert texts(got[line["custom_id"]]) == texts({"response": {"body": expected}})
