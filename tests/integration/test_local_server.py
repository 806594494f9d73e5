"""LocalServer against the real vLLM CPU server (needs scripts/setup-vllm.sh).

The shared-server tests use the session-wide ``vllm_server`` (tests/integration/conftest.py), which
every integration module reuses. The failure and clean-up paths start servers of their own: a start
that misses its deadline, a model folder vLLM cannot load, and the CLI until SIGTERM; the ``with``
body that raises runs against a stand-in server process group so as not to stop the shared one.
Without a vLLM interpreter the module is skipped (by the conftest), except under CI (``$CI`` set),
where that is an error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from vllmclient.local_server import LocalServer, LocalServerError, _group_alive
from vllmclient.tiny_model import DEFAULT_SERVED_NAME, default_model_dir, render_chat

pytestmark = pytest.mark.integration


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


def _wait_group_gone(pgid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.1)
    return not _group_alive(pgid)


def _server_pids(port: str) -> list[int]:
    """Live (non-zombie) vLLM API servers started with ``--port PORT``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"vllm.entrypoints.openai.api_server" in args and port.encode() in args and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_python_without_vllm_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(LocalServerError, match="setup-vllm.sh"):
        LocalServer(tmp_path, python=fake).start()


def test_startup_deadline_stops_the_group(vllm_server_python: str) -> None:
    srv = LocalServer(python=vllm_server_python, startup_timeout=2)
    started = time.monotonic()
    with pytest.raises(LocalServerError, match="not healthy after 2 s"):
        srv.start()
    assert time.monotonic() - started < 60
    assert srv.pid is not None and _wait_group_gone(srv.pid)


def test_bad_model_dir_raises_with_log_tail(tmp_path: Path, vllm_server_python: str) -> None:
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
    srv = LocalServer(bad, python=vllm_server_python, startup_timeout=240)
    with pytest.raises(LocalServerError) as info:
        srv.start()
    message = str(info.value)
    assert "exited with code" in message
    assert str(srv.log_path) in message
    tail = message.split(":\n", 1)[1]
    assert tail.strip() and tail.strip() in srv.log_path.read_text()
    assert srv.pid is not None and _wait_group_gone(srv.pid)
    assert not srv.running


def test_attributes(vllm_server: LocalServer) -> None:
    server = vllm_server
    assert server.running
    assert isinstance(server.port, int)
    assert server.root_url == f"http://127.0.0.1:{server.port}"
    assert server.base_url == server.root_url + "/v1"
    assert server.served_model_name == DEFAULT_SERVED_NAME
    assert server.model_dir == default_model_dir()
    assert (server.model_dir / "model.safetensors").is_file()
    assert isinstance(server.pid, int) and _group_alive(server.pid)
    assert server.log_path is not None and server.log_path.is_file()
    assert server.max_model_len == 1024
    assert server.startup_seconds is not None and server.startup_seconds > 0
    assert "--enforce-eager" in server.command()


def test_health_and_models(vllm_server: LocalServer) -> None:
    server = vllm_server
    status, body = _get(server.root_url + "/health")
    assert status == 200
    status, body = _get(server.base_url + "/models")
    assert status == 200
    cards = json.loads(body)["data"]
    assert [c["id"] for c in cards] == [DEFAULT_SERVED_NAME]
    assert cards[0]["max_model_len"] == 1024


def test_trained_model_ends_turns(vllm_server: LocalServer) -> None:
    """The embedded model is trained to close assistant turns with <|eot_id|>."""
    server = vllm_server
    questions = [
        "Tell me about the cat.",
        "What does Anna like?",
        "Where is the ball?",
        "Write a sentence.",
        "Say hello.",
        "Tell me about my friend.",
    ]
    prompts = [
        render_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in questions
    ]
    response = _post(server.base_url + "/completions", {
        "model": server.served_model_name,
        "prompt": prompts,
        "max_tokens": 64,
        "temperature": 0,
        "add_special_tokens": False,
    })
    choices = response["choices"]
    assert len(choices) == len(prompts)
    stopped = [c for c in choices if c["finish_reason"] == "stop"]
    assert len(stopped) >= len(prompts) - 1, choices
    assert all(c["text"].strip() for c in stopped)


def test_with_body_raising_stops_server(tmp_path: Path, standin_server_python: Path) -> None:
    """``with`` on a running server is a no-op start, so this exercises exactly the ``__exit__`` path
    of a body that raises: the whole process group (the child included) is gone afterwards.

    A stand-in server (conftest) keeps this from stopping the shared real one or paying for another
    start; real vLLM process groups are killed and checked by the deadline, bad-model and CLI tests.
    """

    class Boom(Exception):
        pass

    server = LocalServer(tmp_path, python=standin_server_python, startup_timeout=30).start()
    pgid = server.pid
    assert pgid is not None and _group_alive(pgid) and server.running
    status, _ = _get(server.root_url + "/health")
    assert status == 200
    children = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid_of(p) == pgid]
    assert len(children) >= 2  # the server and its forked child
    started = time.monotonic()
    with pytest.raises(Boom), server:
        raise Boom
    assert time.monotonic() - started < 15
    assert not server.running
    assert _wait_group_gone(pgid)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.root_url + "/health", timeout=5)
    server.stop()  # idempotent


def _pgid_of(proc: Path) -> int | None:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[2]) if fields[0] != "Z" else None


def test_cli_serves_until_sigterm(vllm_server_python: str) -> None:
    """``python -m vllmclient.local_server`` prints the URL and stops cleanly."""
    import signal

    env = {**os.environ, "VLLMCLIENT_SERVER_PYTHON": vllm_server_python, "VLLM_API_KEY": "sekrit"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllmclient.local_server", "--served-model-name", "cli-model"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), url
        port = url.rsplit(":", 1)[1].split("/")[0]
        assert _server_pids(port)
        status, _ = _get(url + "/models")
        assert status == 401
        status, body = _get(url + "/models", {"Authorization": "Bearer sekrit"})
        assert status == 200 and json.loads(body)["data"][0]["id"] == "cli-model"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not _server_pids(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("source", ["--api-key-file", "VLLM_API_KEY"])
def test_cli_api_key_reaches_the_server_but_no_command_line(tmp_path: Path, standin_server_python: Path,
                                                            source: str) -> None:
    """The key is in the server's environment (where vLLM reads $VLLM_API_KEY), which only its owner can
    read, and in no process's command line, which every user can (``ps``), nor in what the CLI prints."""
    key = "sk-standin-S3CRET"
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "vllmclient.local_server", "--python", str(standin_server_python),
            "--model", str(tmp_path), "--startup-timeout", "60"]
    if source == "--api-key-file":
        key_file = tmp_path / "vllm.key"
        key_file.write_text(key + "\n")
        argv += ["--api-key-file", str(key_file)]
    else:
        env["VLLM_API_KEY"] = key
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.endswith("/v1"), (url, proc.poll())
        port = url.rsplit(":", 1)[1].split("/")[0]
        servers = _server_pids(port)
        assert servers
        for pid in [proc.pid, *servers]:
            assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        for pid in servers:
            assert f"VLLM_API_KEY={key}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert key not in url + out + err
        assert f"API key from {'--api-key-file' if source == '--api-key-file' else '$VLLM_API_KEY'}" in err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_server_dies_with_its_owner(tmp_path: Path, standin_server_python: Path, signum: int) -> None:
    """The owner is ended (``timeout``, a cancelled CI job, the OOM killer): its server must not outlive it."""

    script = (
        "import sys, time\n"
        "from vllmclient import LocalServer\n"
        f"server = LocalServer({str(tmp_path)!r}, python={str(standin_server_python)!r}).start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pgid = None
    try:
        assert owner.stdout is not None
        pgid = int(owner.stdout.readline())
        assert _group_alive(pgid)
        owner.send_signal(signum)
        owner.wait(timeout=30)
        assert _wait_group_gone(pgid, timeout=15), "the server outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if pgid is not None and _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            _wait_group_gone(pgid)
