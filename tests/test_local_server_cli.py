"""The launcher's API key never goes on a command line, where every user sees it (``ps``) for the
server's whole life: the CLI takes it from $VLLM_API_KEY or --api-key-file, LocalServer from api_key=.

These paths fail before any server starts; starting one with a key is tested against a stand-in server
in tests/integration/test_local_server.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllmclient import ConfigurationError, LocalServer, VLLMClientError
from vllmclient.cli import serve as main

KEY = "sk-cli-S3CRET"
NO_VLLM = ["--python", "/nonexistent/python"]  # were the check to let a call through, it would fail fast


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([*NO_VLLM, *argv])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert KEY not in out + err
    return err


@pytest.mark.parametrize(
    "argv",
    [["--api-key", KEY], [f"--api-key={KEY}"], ["--port", "8000", "--api-key", KEY, "--", "--seed", "1"],
     ["--", "--api-key", KEY], ["--", f"--api-key={KEY}"]],
    ids=["option", "option=", "among-others", "after-dashes", "after-dashes="],
)
def test_a_key_on_the_command_line_is_refused_with_the_alternatives(argv, capsys):
    err = _cli_error(argv, capsys)
    assert "--api-key" in err and "ps" in err
    assert "VLLM_API_KEY" in err and "--api-key-file" in err


def test_the_console_script_refuses_it_too():
    result = subprocess.run(
        [sys.executable, "-m", "vllmclient.local_server", *NO_VLLM, "--api-key", KEY],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "VLLM_API_KEY" in result.stderr and "--api-key-file" in result.stderr
    assert KEY not in result.stdout + result.stderr


def test_an_api_key_file_that_cannot_be_used_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "missing.key"
    err = _cli_error(["--api-key-file", str(missing)], capsys)
    assert str(missing) in err and "cannot read" in err

    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    assert "is empty" in _cli_error(["--api-key-file", str(empty)], capsys)

    two = tmp_path / "two.key"
    two.write_text(f"{KEY}\n{KEY}-2\n")
    assert "one key" in _cli_error(["--api-key-file", str(two)], capsys)


@pytest.mark.parametrize("extra", [["--api-key", KEY], [f"--api-key={KEY}"]], ids=["option", "option="])
def test_local_server_refuses_a_key_in_extra_args(tmp_path, extra):
    with pytest.raises(ConfigurationError) as info:
        LocalServer(tmp_path, python=sys.executable, extra_args=["--seed", "1", *extra])
    assert isinstance(info.value, VLLMClientError)
    assert "api_key=" in str(info.value) and KEY not in str(info.value)


def test_a_forked_child_does_not_inherit_the_sigterm_handler():
    """Found when distilabel's pool hung at teardown in CI: a forked worker kept the owner's Python-level SIGTERM
    handler, which never runs while the worker's main thread waits on a lock and another thread takes the signal,
    so Pool.terminate() waited forever. A child must die of SIGTERM like any process."""
    import signal

    from vllmclient import local_server

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        local_server._stop_servers_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) is local_server._exit_on_sigterm
        pid = os.fork()
        if pid == 0:  # the child: report what it got, without running pytest's cleanup
            os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert signal.getsignal(signal.SIGTERM) is local_server._exit_on_sigterm  # the owner keeps it
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("given", ["/nonexistent/model", "./no-such-model", "~/no-such-model-h23"])
def test_a_model_folder_that_does_not_exist_is_refused_before_vllm_starts(given):
    """A mistyped folder went to vLLM, which read it as a Hugging Face repo id and failed after seconds of start-up
    with 'Repo id must use alphanumeric chars' (or a hub lookup), never saying the folder is missing."""
    with pytest.raises(ConfigurationError) as info:
        LocalServer(given, python=sys.executable)
    message = str(info.value)
    assert str(Path(given).expanduser().resolve()) in message and "does not exist" in message, message


def test_serve_names_a_missing_model_folder(tmp_path, capsys):
    missing = tmp_path / "tiny-llama-typo"
    with pytest.raises(SystemExit) as info:
        main([*NO_VLLM, "--model", str(missing)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--model" in err and str(missing) in err and "does not exist" in err, err


def test_a_hub_repo_id_is_still_passed_to_vllm_as_it_is():
    server = LocalServer("Qwen/Qwen2.5-0.5B-Instruct", python=sys.executable)  # not started: nothing is fetched
    assert str(server.model_dir) == "Qwen/Qwen2.5-0.5B-Instruct" and server.served_model_name == "Qwen2.5-0.5B-Instruct"
