"""Job files as a new user meets them: odd inputs and outputs, two runs at once, what each record and error says."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from vllmclient import ClientvLLM, ConfigurationError, run_batch_file
from vllmclient._job_output import JobOutput, identity, sidecar_path
from vllmclient.cli import main
from vllmclient.jobs import _Input


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


@pytest.mark.parametrize("lines", [[chat("a", "hello")], []], ids=["input with lines", "empty input"])
def test_an_output_that_is_the_input_itself_is_refused_as_such_and_left_alone(lines, client, tmp_path):
    """``-o`` naming the input (or a link to it) would append records to the very file being read."""
    source = write_lines(tmp_path / "in.jsonl", lines)
    link = tmp_path / "link.jsonl"
    link.symlink_to(source)
    for out in (source, link):
        with pytest.raises(ConfigurationError, match="is the input") as info:
            run_batch_file(client, source, out, progress=False, max_new_tokens=4)
        assert "choose another output" in str(info.value).lower()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl", "link.jsonl"]
    assert source.read_text() == "".join(json.dumps(line) + "\n" for line in lines)


@pytest.mark.parametrize(("option", "value"), [
    ("--n", "0"), ("--temperature", "nan"), ("--max-tokens", "0"), ("--top-p", "2"), ("--stop", ""),
    ("--max-concurrency", "0"), ("--timeout", "0"), ("--max-retries", "-1"), ("--chat-template-kwargs", "[1]"),
])
def test_a_bad_command_line_option_is_named_as_typed_and_nothing_is_written(option, value, fake_vllm, tmp_path,
                                                                            capsys):
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hello")])
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", fake_vllm.base_url,
            "--no-progress", option, value]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err, err
    # named as typed all through, not as generate's parameter ("argument --stop: stop=[''] is invalid")
    assert not re.search(r"(?<![-\w])(max_new_tokens|num_generations|temperature|top_p|stop)\b", err), err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl"]


def test_an_empty_completion_prompt_fails_its_line_as_vllm_fails_it_alone_and_is_not_sent(client, fake_vllm,
                                                                                          tmp_path):
    """vLLM refuses ``"prompt": ""`` sent alone (400), but answers it inside a list of prompts: packed with the
    other lines it would get an answer its line alone never gets. It fails its line here, naming it."""
    lines = [{"custom_id": name, "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny-llama", "prompt": prompt, "max_tokens": 3}}
             for name, prompt in [("empty", ""), ("full", "Once upon a time")]]
    source = write_lines(tmp_path / "in.jsonl", lines)
    summary = run_batch_file(client, source, tmp_path / "out.jsonl", progress=False)
    got = {json.loads(line)["custom_id"]: json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()}
    assert (summary.done, summary.failed) == (1, {"InvalidInputError": 1})
    error = got["empty"]["error"]
    assert error["message"].startswith("line 1: ") and "empty" in error["message"] and error["retryable"] is False
    assert got["empty"]["response"] is None  # nothing was sent for it
    assert all("" not in (r.body["prompt"] if isinstance(r.body["prompt"], list) else [r.body["prompt"]])
               for r in fake_vllm.requests_to("/v1/completions"))


def _keys(body: dict[str, Any]) -> dict[str, set[str]]:
    choice = body["choices"][0]
    return {"body": set(body), "choice": set(choice), "message": set(choice["message"]), "usage": set(body["usage"])}


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2}, {"n": 2, "temperature": 0.8}])
def test_a_chat_line_rendered_with_the_tokenizer_has_every_field_of_the_servers_chat_answer(extra, fake_vllm,
                                                                                            tokenizer_dir, tmp_path):
    """With --tokenizer a chat line is sent as a completion and its answer reshaped as a chat answer: a reader of
    body["choices"][0]["message"]["refusal"] or body["usage"]["completion_tokens_details"] must find it, and find
    no field the server's chat path leaves out (an empty "tool_calls": vLLM's ChatMessage drops it)."""
    line = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                     **extra}}
    source = write_lines(tmp_path / "in.jsonl", [line])
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=str(tokenizer_dir), max_retries=0) as llm:
        run_batch_file(llm, source, tmp_path / "out.jsonl", progress=False)
    (record,) = [json.loads(text) for text in (tmp_path / "out.jsonl").read_text().splitlines()]
    request = urllib.request.Request(fake_vllm.base_url + line["url"], data=json.dumps(line["body"]).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as answer:
        expected = json.loads(answer.read())
    mine, theirs = _keys(record["response"]["body"]), _keys(expected)
    assert {part: theirs[part] - mine[part] for part in theirs} == {part: set() for part in theirs}
    assert mine["message"] == theirs["message"]


@pytest.mark.parametrize(("url", "fields", "named", "not_named"), [
    ("/v1/completions", {"max_tokens": "5"}, "max_tokens='5'", "max_new_tokens"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens=0", "max_new_tokens"),
    ("/v1/completions", {"n": "2"}, "n='2'", "num_generations"),
    ("/v1/chat/completions", {"n": 2, "temperature": 0}, "n=2", "num_generations"),
    ("/v1/chat/completions", {"max_completion_tokens": 100000}, "max_completion_tokens=100000", "max_new_tokens"),
    ("/v1/chat/completions", {"guided_json": {"type": "object"}}, "the body field 'guided_json'", "extra_body"),
    ("/v1/completions", {"guided_choice": ["a"]}, "the body field 'guided_choice'", "structured_outputs="),
    ("/v1/chat/completions", {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
     "structured_outputs and the body field 'response_format'", "extra_body"),
    ("/v1/chat/completions", {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
     "structured_outputs and the body field 'response_format'", "structured_outputs="),
])
def test_a_bad_body_field_is_named_as_the_line_wrote_it(url, fields, named, not_named, client, tmp_path):
    """Body fields keep vLLM's names: the error names n and max_tokens, not the client's parameter names."""
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in url else {"prompt": "hi"}
    line = {"custom_id": "x", "method": "POST", "url": url, "body": {"model": "tiny-llama", **prompt, **fields}}
    source = write_lines(tmp_path / "in.jsonl", [line])
    run_batch_file(client, source, tmp_path / "out.jsonl", progress=False)
    (record,) = [json.loads(text) for text in (tmp_path / "out.jsonl").read_text().splitlines()]
    message = record["error"]["message"]
    assert message.startswith("line 1: ") and named in message and not_named not in message, message


def test_a_line_nested_too_deeply_for_json_fails_alone(client, tmp_path):
    """json.loads raises RecursionError (not ValueError) past ~1000 levels: that line fails, the job goes on."""
    deep = "[" * 100_000 + "]" * 100_000
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([json.dumps(chat("ok", "hello")), deep,
                                 '{"custom_id": "deep", "messages": ' + deep + "}"]) + "\n")
    summary = run_batch_file(client, source, tmp_path / "out.jsonl", progress=False, max_new_tokens=3)
    got = {json.loads(line)["custom_id"]: json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()}
    assert (summary.done, summary.failed) == (1, {"InvalidLineError": 2})
    assert got["ok"]["error"] is None
    for custom_id, number in (("line-2", 2), ("line-3", 3)):
        assert got[custom_id]["error"]["message"].startswith(f"line {number}: ")
        assert "nested too deeply" in got[custom_id]["error"]["message"]


def test_a_custom_id_or_field_with_a_lone_surrogate_is_recorded_and_resumed(client, fake_vllm, tmp_path):
    """JSON may escape a lone surrogate ("\\ud800"), which UTF-8 cannot encode: its record is written escaped (still
    JSON, read back as the same custom_id), not a UnicodeEncodeError that ends the whole job."""
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([
        json.dumps(chat("ok", "hello")),
        '{"custom_id": "sur\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        '{"custom_id": "bad\\udfff", "messages": "not a conversation"}',
        '{"custom_id": "role", "messages": [{"role": "\\ud800", "content": "hi"}]}',
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    summary = run_batch_file(client, source, out, progress=False, max_new_tokens=3)
    assert (summary.done, sum(summary.failed.values())) == (2, 2)
    got = {json.loads(line)["custom_id"]: json.loads(line) for line in out.read_bytes().split(b"\n") if line}
    assert set(got) == {"ok", "sur\ud800", "bad\udfff", "role"}
    assert got["sur\ud800"]["error"] is None and got["bad\udfff"]["error"]["line"] == 3
    fake_vllm.clear()
    again = run_batch_file(client, source, out, progress=False, max_new_tokens=3)
    assert (again.already_done, again.done) == (4, 0) and not fake_vllm.requests_to("/v1/chat/completions")


def test_the_summary_json_goes_where_asked_or_fails_clearly(fake_vllm, tmp_path, capsys):
    """Its folder is made as the output's is; a directory is refused before the job; a path that cannot be written
    (under a file) is a clear error after the job, whose summary was printed anyway, never a traceback."""
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hello")])

    def run(summary: Path, out: str) -> int:
        return main(["run", str(source), "-o", str(tmp_path / out), "--base-url", fake_vllm.base_url,
                     "--no-progress", "--max-tokens", "3", "--summary-json", str(summary)])

    assert run(tmp_path / "new" / "dir" / "summary.json", "a.jsonl") == 0
    assert json.loads((tmp_path / "new" / "dir" / "summary.json").read_text())["done"] == 1
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "b.jsonl")
    assert info.value.code == 2 and "argument --summary-json" in capsys.readouterr().err
    assert not (tmp_path / "b.jsonl").exists()
    assert run(source / "summary.json", "c.jsonl") == 1
    err = capsys.readouterr().err
    assert "1 inputs" in err and f"could not write the summary to {source / 'summary.json'}" in err
    assert "Traceback" not in err and (tmp_path / "c.jsonl").read_text().count("\n") == 1


def test_an_input_that_is_a_pipe_is_refused_clearly_before_anything_is_written(client, tmp_path):
    """A job reads its input twice (fingerprint, then each line by its offset): a pipe (/dev/stdin, <(...)) cannot
    be read so; the error says so and what to do, instead of io.UnsupportedOperation from deep inside."""
    read, write = os.pipe()
    os.write(write, (json.dumps(chat("a", "hello")) + "\n").encode())
    os.close(write)
    try:
        with pytest.raises(ConfigurationError, match="not a regular file") as info:
            run_batch_file(client, f"/dev/fd/{read}", tmp_path / "out.jsonl", progress=False, max_new_tokens=3)
    finally:
        os.close(read)
    assert "save it to a file" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("options", "named", "not_named"), [
    (["--n", "2", "--temperature", "0"], "--n 2", "num_generations"),
    (["--min-tokens", "50", "--max-tokens", "10"], "--max-tokens 10", "max_new_tokens"),
    (["--max-tokens", "5000"], "--max-tokens 5000", "max_new_tokens"),
])
def test_options_that_fail_together_are_named_as_typed(options, named, not_named, fake_vllm, tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hello")])
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", fake_vllm.base_url, "--no-progress",
            *options]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and named in err and not_named not in err, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_job_resumed_against_a_server_of_another_model_is_refused(fake_vllm, make_fake_vllm, tmp_path):
    """The server's address may change between runs, its model may not: the lines run again would be answered by
    another model than the records kept, in one output. Refused, naming both, and nothing written."""
    source = write_lines(tmp_path / "in.jsonl", [chat(f"q{i}", f"question {i}") for i in range(4)])
    out = tmp_path / "out.jsonl"
    fake_vllm.fail_next(503, path="*", times=1, match="question 3")
    with ClientvLLM(base_url=fake_vllm.base_url, max_retries=0) as llm:
        first = run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
    assert (first.done, first.retryable) == (3, 1)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    other = make_fake_vllm(models=[{"id": "other-model", "max_model_len": 1024}])
    with ClientvLLM(base_url=other.base_url, max_retries=0) as llm, pytest.raises(ConfigurationError) as info:
        run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
    assert "'tiny-llama'" in str(info.value) and "'other-model'" in str(info.value)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert not other.requests_to("/v1/chat/completions")
    moved = make_fake_vllm()  # the same model elsewhere: resumed
    with ClientvLLM(base_url=moved.base_url, max_retries=0) as llm:
        again = run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
    assert (again.already_done, again.done) == (3, 1)


@pytest.mark.parametrize("top", [None, 0, 2])
def test_a_rendered_chat_lines_top_logprobs_hold_as_many_as_the_servers_chat_answer(top, fake_vllm, tokenizer_dir,
                                                                                    tmp_path):
    """A completion's top_logprobs hold the sampled token and the top k (k + 1 when it is not among them); a chat
    answer's hold the first k of those (none without top_logprobs). A rendered chat line's record is the chat's."""
    extra = {} if top is None else {"top_logprobs": top}
    line = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
                     "temperature": 1.0, "seed": 3, "logprobs": True, **extra}}
    source = write_lines(tmp_path / "in.jsonl", [line])
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=str(tokenizer_dir), max_retries=0) as llm:
        run_batch_file(llm, source, tmp_path / "out.jsonl", progress=False)
    (record,) = [json.loads(text) for text in (tmp_path / "out.jsonl").read_text().splitlines()]
    content = record["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert content and all(len(step["top_logprobs"]) == (top or 0) for step in content)
    assert all(step["top_logprobs"][0]["token"] == step["token"] for step in content if top)


def test_a_rendered_plain_lines_top_logprobs_hold_as_many_as_asked(fake_vllm, tokenizer_dir, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [chat("p", "Hello")])
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=str(tokenizer_dir), max_retries=0) as llm:
        run_batch_file(llm, source, tmp_path / "out.jsonl", progress=False, max_new_tokens=6, temperature=1.0,
                       seed=3, logprobs=2)
    (record,) = [json.loads(text) for text in (tmp_path / "out.jsonl").read_text().splitlines()]
    content = record["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert content and all(len(step["top_logprobs"]) == 2 for step in content)


@pytest.mark.parametrize("target", ["input", "output", "output's job file", "link to the output"])
def test_a_summary_json_naming_the_jobs_own_files_is_refused_before_anything_runs(target, fake_vllm, tmp_path,
                                                                                  capsys):
    """``--summary-json`` is written after the job: naming the input or the output (or its OUTPUT.job.json, or a link
    to one of them) would overwrite the user's prompts or every record the job just wrote with the summary."""
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hello")])
    out = tmp_path / "out.jsonl"
    argv = ["run", str(source), "-o", str(out), "--base-url", fake_vllm.base_url, "--no-progress", "--max-tokens", "3"]
    assert main(argv) == 0  # an output with a record: the rerun must leave it as it is
    kept = {path: path.read_bytes() for path in (source, out, sidecar_path(out))}
    summary = {"input": source, "output": out, "output's job file": sidecar_path(out)}.get(target)
    if summary is None:
        summary = tmp_path / "summary.json"
        summary.symlink_to(out)
    with pytest.raises(SystemExit) as info:
        main([*argv, "--summary-json", str(summary)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --summary-json" in err, err
    assert {path: path.read_bytes() for path in kept} == kept


def test_an_output_that_is_not_a_regular_file_is_refused_before_anything_is_written(client, fake_vllm, tmp_path):
    """``-o /dev/null`` (or /dev/stdout, or a link to one): a job appends to the output and resumes from it. It ran
    the whole job into the device, then failed with a traceback (fsync) and left OUTPUT.job.json beside it."""
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hello")])
    out = tmp_path / "out.jsonl"
    out.symlink_to(os.devnull)
    with pytest.raises(ConfigurationError, match="not a regular file") as info:
        run_batch_file(client, source, out, progress=False, max_new_tokens=3)
    assert "pass a file path" in str(info.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    assert not fake_vllm.requests_to("/v1/chat/completions")


def test_an_input_rewritten_while_its_job_runs_stops_the_job_and_no_line_gets_another_lines_answer(
        make_fake_vllm, tmp_path):
    """A job reads each line again by its offset when it sends it. Rewritten in place meanwhile (``> in.jsonl``
    from a script that made it), the offsets held the new file's lines: records named after the old lines held
    answers to the new ones, silently (or the job died with a traceback on a line cut in two). It stops instead,
    saying why; the records it wrote answer their own lines."""
    server = make_fake_vllm(latency=0.02)
    source = write_lines(tmp_path / "in.jsonl", [chat(f"c{i:03d}", f"old {i:03d}") for i in range(80)])
    out = tmp_path / "out.jsonl"

    def rewrite_when_started() -> None:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_bytes().count(b"\n") >= 4) and time.monotonic() < deadline:
            time.sleep(0.005)
        with source.open("r+b") as file:  # the same file, other lines of the same length
            file.write("".join(json.dumps(chat(f"c{i:03d}", f"new {i:03d}")) + "\n" for i in range(80)).encode())

    rewriter = threading.Thread(target=rewrite_when_started)
    rewriter.start()
    with (ClientvLLM(base_url=server.base_url, max_retries=0, max_concurrency=2) as llm,
          pytest.raises(ConfigurationError, match="changed while the job ran") as info):
        run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
    rewriter.join()
    assert "run the same command again" in str(info.value)
    assert not [prompt for prompt in server.answered_prompts if "new" in str(prompt)]
    assert 4 <= out.read_bytes().count(b"\n") < 80


def test_a_rerun_summary_still_counts_the_failed_lines_it_kept(client, fake_vllm, tmp_path, capsys):
    """A rerun keeps lasting failures (a bad line, a 400) as they are; its summary said "3 done before, 0 done now,
    0 failed" and its --summary-json "failed": {}, so a script checking it took a job with failed lines as clean."""
    lines = [chat("a", "hello"), chat("b", "hi"), {"custom_id": "bad", "messages": [{"role": "nobody", "content": "x"}]}]
    source = write_lines(tmp_path / "in.jsonl", lines)
    first = run_batch_file(client, source, tmp_path / "out.jsonl", progress=False, max_new_tokens=3)
    assert (first.done, sum(first.failed.values()), first.failed_before) == (2, 1, 0)
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", fake_vllm.base_url, "--no-progress",
            "--max-tokens", "3", "--summary-json", str(tmp_path / "summary.json")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["already_done"], summary["failed_before"], summary["done"], summary["failed"]) == (3, 1, 0, {})
    assert "3 done before (1 of them failed)" in capsys.readouterr().err


@pytest.mark.parametrize("ids", [False, True], ids=["text", "token ids asked"])
def test_a_packed_completion_lines_body_is_field_for_field_the_servers_answer_to_it_alone(ids, client, fake_vllm,
                                                                                          tmp_path):
    """Lines sharing a body go in one request and its answer is cut apart: each piece must hold every field the
    server answers the line alone (usage's completion_tokens_details was lost), with the same values."""
    lines = [{"custom_id": f"s{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny-llama", "prompt": f"Shared body {i}", "max_tokens": 5, "seed": 3, "n": 2,
                       "logprobs": 1, "return_token_ids": ids}} for i in range(4)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    run_batch_file(client, source, tmp_path / "out.jsonl", progress=False)
    assert any(len(r.body["prompt"]) == 4 for r in fake_vllm.requests_to("/v1/completions"))  # packed
    got = {record["custom_id"]: record for record in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    for line in lines:
        request = urllib.request.Request(fake_vllm.base_url + line["url"], data=json.dumps(line["body"]).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as answer:
            expected = json.loads(answer.read())
        body = got[line["custom_id"]]["response"]["body"]
        volatile = {"id", "created", "system_fingerprint"}
        assert {k: v for k, v in body.items() if k not in volatile} == {
            k: v for k, v in expected.items() if k not in volatile}


def test_a_job_resumed_naming_the_model_it_was_served_by_goes_on(make_fake_vllm, tmp_path):
    """What matters is the model that answers, which the job keeps (served_model): a rerun that names it with
    --model (the first run took the server's default, or the other way round) was refused as 'another job'.
    Naming another model (a LoRA adapter the server also serves) is still refused, nothing written."""
    server = make_fake_vllm(models=[{"id": "tiny-llama", "max_model_len": 1024},
                                    {"id": "adapter", "parent": "tiny-llama", "max_model_len": 1024}])
    source = write_lines(tmp_path / "in.jsonl", [chat(f"q{i}", f"question {i}") for i in range(4)])
    out = tmp_path / "out.jsonl"
    server.fail_next(503, path="*", times=1, match="question 3")
    with ClientvLLM(base_url=server.base_url, max_retries=0) as llm:
        first = run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
    assert (first.done, first.retryable) == (3, 1)
    before = out.read_bytes()
    with ClientvLLM(base_url=server.base_url, max_retries=0, model="adapter") as llm, \
            pytest.raises(ConfigurationError, match="adapter"):
        run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
    assert out.read_bytes() == before
    with ClientvLLM(base_url=server.base_url, max_retries=0, model="tiny-llama") as llm:
        again = run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
    assert (again.already_done, again.done) == (3, 1)


@pytest.mark.parametrize("kind", ["completion lines", "plain lines, rendered"])
def test_a_line_the_server_fails_with_500_no_longer_fails_the_lines_packed_with_it_on_a_rerun(kind, fake_vllm,
                                                                                              tokenizer_dir, tmp_path):
    """A prompt that makes the server fail (HTTP 500) fails its whole pack, a transient failure that a rerun runs
    again; but a rerun packed the same lines together again, so the good ones failed with it on every rerun. A
    rerun sends the lines a 500 failed one per request: only the guilty line fails again."""
    fake_vllm.fail_prompts_containing("POISON", status=500, message="engine error")
    texts = [("POISON " if i == 3 else "") + f"fine {i}" for i in range(8)]
    if kind == "completion lines":
        lines: list[Any] = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
                             "body": {"model": "tiny-llama", "prompt": text, "max_tokens": 3}}
                            for i, text in enumerate(texts)]
    else:
        lines = [chat(f"p{i}", text) for i, text in enumerate(texts)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=str(tokenizer_dir), max_retries=0) as llm:
        first = run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
        assert first.failed == {"ServerError": 8}  # one request for all: the server failed it
        second = run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
        assert (second.done, second.failed) == (7, {"ServerError": 1})
        third = run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
        assert (third.already_done, third.done, third.failed) == (7, 0, {"ServerError": 1})
    got = {record["custom_id"]: record for record in map(json.loads, out.read_text().splitlines())}
    assert len(got) == 8 and [name for name, record in got.items() if record["error"]] == ["p3"]


def test_the_command_lines_warnings_name_the_client_once(fake_vllm, tmp_path):
    """The library's messages begin with 'vllmclient:'; the command line's log format added the logger's name again
    ('WARNING vllmclient: vllmclient: replica ... failed')."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hello")])
    process = subprocess.run(
        [sys.executable, "-m", "vllmclient", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url",
         fake_vllm.base_url, "--base-url", dead, "--no-progress", "--max-tokens", "3"],
        check=False, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert f"WARNING vllmclient: replica {dead}/v1 failed" in process.stderr, process.stderr
    assert "vllmclient: vllmclient:" not in process.stderr


@pytest.mark.parametrize("status", [401, 404])
def test_a_line_failed_by_a_key_or_model_the_server_stopped_taking_mid_job_is_run_again(status, fake_vllm,
                                                                                        tmp_path):
    """A 401 (the server restarted with another key) or a 404 (no longer serving the model) mid-job says nothing
    about the line: a rerun, which loads the server again with the right key and model, must run it. Its record
    was kept as a lasting failure, so the rerun skipped the line for good (short of editing the output)."""
    source = write_lines(tmp_path / "in.jsonl", [chat(f"q{i}", f"question {i}") for i in range(4)])
    out = tmp_path / "out.jsonl"
    body = {"error": {"message": "The model `tiny-llama` does not exist.", "type": "NotFoundError",
                      "param": "model", "code": 404}} if status == 404 else None
    fake_vllm.fail_next(status, body=body, path="/v1/chat/completions", match="question 2")
    with ClientvLLM(base_url=fake_vllm.base_url, max_retries=0) as llm:
        first = run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
        assert first.done == 3 and first.retryable == 1, first
        again = run_batch_file(llm, source, out, progress=False, max_new_tokens=3)
    assert (again.already_done, again.done) == (3, 1)
    assert all(record["error"] is None for record in map(json.loads, out.read_text().splitlines()))


@pytest.mark.parametrize("kind", ["completion lines", "plain lines, rendered"])
def test_each_packed_lines_body_has_its_own_id_as_vllm_names_that_prompt(kind, fake_vllm, tokenizer_dir, tmp_path):
    """A pack's answer has one id; each line's body held that same id, so lines answered together looked like one
    answer to whoever keys answers by id (as the server alone gives each its own). Each gets vLLM's own name for
    its prompt in the request (``<id>-<position>``, the request id vLLM gives that prompt)."""
    if kind == "completion lines":
        lines: list[Any] = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
                             "body": {"model": "tiny-llama", "prompt": f"text {i}", "max_tokens": 3}} for i in range(5)]
    else:
        lines = [chat(f"p{i}", f"text {i}") for i in range(5)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=str(tokenizer_dir), max_retries=0) as llm:
        run_batch_file(llm, source, tmp_path / "out.jsonl", progress=False, max_new_tokens=3)
    (sent,) = fake_vllm.requests_to("/v1/completions")
    assert len(sent.body["prompt"]) == 5  # one pack
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    ids = {record["custom_id"]: record["response"]["body"]["id"] for record in records}
    assert len(set(ids.values())) == 5, ids
    (request_id,) = {record["response"]["request_id"] for record in records}  # the one request they went in
    prefix = "chatcmpl-" if kind != "completion lines" else "cmpl-"
    assert [ids[f"p{i}"] for i in range(5)] == [f"{prefix}{request_id}-{i}" for i in range(5)]


def test_the_warning_about_options_batch_lines_ignore_names_them_as_a_body_and_the_command_line_do(fake_vllm,
                                                                                                  tmp_path):
    """It advises putting the options in the lines' bodies, which use vLLM's names, as the command line does
    (--max-tokens, --n); it named generate's parameters (max_new_tokens, num_generations) instead."""
    import subprocess
    import sys

    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny-llama", "prompt": "hello", "max_tokens": 3}}
    source = write_lines(tmp_path / "in.jsonl", [line])
    process = subprocess.run(
        [sys.executable, "-m", "vllmclient", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url",
         fake_vllm.base_url, "--no-progress", "--max-tokens", "3", "--n", "2", "--temperature", "0.5"],
        check=False, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    (warning,) = [text for text in process.stderr.splitlines() if "plain lines" in text]
    assert "max_tokens, temperature, n apply to plain lines only" in warning, warning
    assert "max_new_tokens" not in warning and "num_generations" not in warning


def test_an_answer_the_client_cannot_reshape_fails_its_line_not_the_job(fake_vllm, tokenizer_dir, tmp_path):
    """A chat line rendered with --tokenizer has its completion answer reshaped into a chat answer; an answer of a
    shape that reshaping cannot take (here a logprobs token that is null) raised out of the job, which died with a
    traceback and left the other lines unrun. It is that line's failure, the server's (as any unreadable answer)."""
    lines = [chat(f"c{i}", f"question {i}") for i in range(4)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    odd = {"id": "cmpl-odd", "object": "text_completion", "model": "tiny-llama",
           "choices": [{"index": 0, "text": "x", "finish_reason": "stop",
                        "logprobs": {"tokens": [None], "token_logprobs": [None], "top_logprobs": [None]}}]}
    fake_vllm.fail_next(200, body=odd, path="/v1/completions", match="question 1")
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=str(tokenizer_dir), max_retries=0, pack_size=1) as llm:
        summary = run_batch_file(llm, source, tmp_path / "out.jsonl", progress=False, max_new_tokens=3, logprobs=1)
    got = {record["custom_id"]: record for record in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert len(got) == 4 and summary.done == 3
    error = got["c1"]["error"]
    assert error["line"] == 2 and "unexpected shape" in error["message"] and error["retryable"], error


def test_a_summary_json_naming_the_api_key_file_is_refused_before_anything_runs(make_fake_vllm, tmp_path, capsys):
    """``--summary-json`` is written over its path after the job: naming the ``--api-key-file`` (a sibling of the
    input and output the guard checks) would replace the key with the summary, and the next run would fail."""
    server = make_fake_vllm(api_key="sk-secret")
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hello")])
    key = tmp_path / "key.txt"
    key.write_text("sk-secret\n")
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", server.base_url, "--no-progress",
            "--max-tokens", "3", "--api-key-file", str(key)]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--summary-json", str(key)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --summary-json" in err and "--api-key-file" in err, err
    assert key.read_text() == "sk-secret\n" and not (tmp_path / "out.jsonl").exists()


class _RewrittenWhenSought(io.FileIO):
    """The input as a job reads it, with a writer that rewrites it just as the job seeks to a line."""

    rewrite: Any = None

    def seek(self, offset: int, whence: int = 0) -> int:
        if self.rewrite is not None:
            self.rewrite()
            self.rewrite = None
        return super().seek(offset, whence)


def test_an_input_rewritten_just_before_a_line_is_read_is_never_taken_for_the_planned_line(tmp_path):
    """The job checked that the input had not changed, then read the line: rewritten in between, the new line was
    sent and its answer recorded under the planned line's custom_id. The check comes after the read now."""
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "old")])
    os.utime(source, ns=(0, 0))  # its stamp differs from the rewrite's however coarse the clock
    with _RewrittenWhenSought(source, "rb") as file:
        reading = _Input(file, source)
        file.rewrite = lambda: source.write_text(json.dumps(chat("a", "new")) + "\n")  # same length, same inode
        with pytest.raises(ConfigurationError, match="changed while the job ran"):
            reading.line(0)


@pytest.mark.parametrize(("first", "again", "named", "not_named"), [
    (["--max-tokens", "4"], ["--max-tokens", "5"], "--max-tokens: 4 then, 5 now", "max_new_tokens"),
    ([], ["--max-tokens", "5"], "--max-tokens: not set then, 5 now", "max_new_tokens"),
    (["--n", "2", "--temperature", "0.5"], ["--n", "3", "--temperature", "0.5"], "--n: 2 then, 3 now",
     "num_generations"),
    (["--seed", "1", "--top-k", "3"], ["--seed", "2", "--top-k", "3"], "--seed: 1 then, 2 now", "top_k"),
])
def test_a_rerun_with_other_options_is_refused_naming_each_option_as_typed(first, again, named, not_named,
                                                                           fake_vllm, tmp_path, capsys):
    """A user who typed --max-tokens is told which option changed, in its own name and value, not as generate's
    parameters dumped together (``params: {} then, {"max_new_tokens": 5} now``)."""
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hello")])
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", fake_vllm.base_url, "--no-progress"]
    assert main([*argv, *first]) == 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    capsys.readouterr()
    assert main([*argv, *again]) == 1
    err = capsys.readouterr().err
    assert "another job" in err and named in err and not_named not in err and "params" not in err, err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_a_resume_with_other_parameters_names_each_parameter_that_differs(client, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hello")])
    out = tmp_path / "out.jsonl"
    run_batch_file(client, source, out, progress=False, max_new_tokens=4, seed=1)
    with pytest.raises(ConfigurationError, match="another job") as info:
        run_batch_file(client, source, out, progress=False, max_new_tokens=5, seed=1, top_p=0.5)
    message = str(info.value)
    assert "max_new_tokens: 4 then, 5 now" in message and "top_p: not set then, 0.5 now" in message, message
    assert "seed" not in message and "params" not in message, message
