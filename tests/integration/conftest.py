"""Fixtures for the integration tests: one real vLLM CPU server shared by the whole session.

Starting vLLM costs ~30-60 s of a 2-core machine, so every module that only needs "a server with the
default tiny model" takes ``vllm_server`` (session-scoped, started on first use, stopped at the end of
the session). Tests that must start their own server (failure paths, an ``--api-key`` server, the
notebook) do so themselves.

Without an interpreter that has vLLM (scripts/setup-vllm.sh), every integration module is skipped;
under CI (``$CI`` set) that is an error instead, so a broken setup cannot pass silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllmclient.local_server import LocalServer, resolve_server_python
from vllmclient.tiny_model import DEFAULT_SERVED_NAME

SERVER_PYTHON = resolve_server_python()
MAX_MODEL_LEN = 1024


def _has_vllm(python: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 1)"
    try:
        return subprocess.run([python, "-c", probe], check=False, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


HAS_VLLM = _has_vllm(SERVER_PYTHON)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's tests when no vLLM interpreter exists, unless under CI (then they run and fail)."""
    if HAS_VLLM or os.environ.get("CI"):
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=f"{SERVER_PYTHON} has no vllm: run scripts/setup-vllm.sh")
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


# A stand-in for ``python -m vllm.entrypoints.openai.api_server``: it passes the launcher's vLLM probe,
# forks a child (as vLLM forks EngineCore and Worker) and answers GET /health with 200 in a fraction of a
# second. For clean-up paths that would otherwise cost a real ~30-60 s server start.
_STANDIN_SERVER = """\
import http.server, os, sys, time
if sys.argv[1] == "-c":
    if len(sys.argv) == 3:  # the launcher's probe: "yes, vLLM imports"
        sys.exit(0)
    code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]  # the launcher's wrapper: owner pid, real command
    exec(code)
import signal
port = int(sys.argv[sys.argv.index("--port") + 1])
child = os.fork()
if child == 0:
    while True:
        time.sleep(1)
def stop(signum, frame):  # as vLLM's API server does on SIGTERM: stop the engine processes, then exit
    os.kill(child, signal.SIGKILL)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


@pytest.fixture
def standin_server_python(tmp_path: Path) -> Path:
    """An executable to pass as ``LocalServer(python=...)``: a fake vLLM that starts at once (see above)."""
    path = tmp_path / "standin-python"
    path.write_text(f"#!{sys.executable}\n{_STANDIN_SERVER}")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def vllm_server_python() -> str:
    """The interpreter that runs vLLM (``.venv-vllm`` or ``$VLLMCLIENT_SERVER_PYTHON``)."""
    return SERVER_PYTHON


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[LocalServer]:
    """A real vLLM server with the embedded trained tiny model, served as ``tiny-llama``, 1024 context.

    Shared by every integration module (started at most once per session). Tests must not stop it.
    """
    server = LocalServer(python=SERVER_PYTHON, max_model_len=MAX_MODEL_LEN)
    assert server.served_model_name == DEFAULT_SERVED_NAME
    with server:
        yield server
    # ``with`` stops the process group; the atexit hook in local_server is the last safety net.


@pytest.fixture(scope="session")
def vllm_tokenizer_dir(vllm_server: LocalServer) -> Path:
    """The served model's folder; it holds the tokenizer (with the chat template) too."""
    assert vllm_server.model_dir is not None
    return Path(vllm_server.model_dir)
