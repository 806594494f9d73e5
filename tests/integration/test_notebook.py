"""examples/quickstart.ipynb runs top to bottom in a real ipykernel against a real vLLM server.

The notebook starts (and stops) its own LocalServer inside the kernel; that is the point: the sync
``generate_outputs`` runs inside the kernel's running event loop, and ``await llm.agenerate`` at top
level. A copy is executed (the committed notebook, with its saved outputs, is left alone) by
examples/execute_notebook.py's ``execute_notebook``, in a kernel on this very interpreter.

Every process the kernel starts carries a marker in its environment, so whatever the notebook leaves
behind (say, a failing cell skipped the clean-up cell and the kernel had to be killed) is found and
killed here, and only that: never a server someone else runs on the machine.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from types import ModuleType

import nbformat
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
MARKER = "VLLMCLIENT_NOTEBOOK_TEST"


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("execute_notebook", ROOT / "examples" / "execute_notebook.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _marked_pids(token: str) -> list[int]:
    """Live (non-zombie) processes whose environment has ``MARKER=token``."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def _kill_marked(token: str, timeout: float = 15.0) -> list[int]:
    """SIGTERM, then SIGKILL, every marked process (and its group); returns what was found alive."""
    found = _marked_pids(token)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _marked_pids(token):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + timeout
        while _marked_pids(token) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _marked_pids(token):
            break
    return found


def _cell(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}"
    return cells[0]


def _text(cell: nbformat.NotebookNode) -> str:
    """What a cell printed (stdout) and displayed as text; stderr is left out."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream" and output.get("name") == "stdout":
            parts.append(output["text"])
        elif output["output_type"] in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _stderr(cell: nbformat.NotebookNode) -> str:
    return "".join(o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream" and o["name"] == "stderr")


WIDGET = "application/vnd.jupyter.widget-view+json"


def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _load_runner()
    copy = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, copy)
    committed = NOTEBOOK.read_bytes()
    token = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, token)  # inherited by the kernel, hence by the vLLM server it starts
    try:
        nb = runner.execute_notebook(copy, cwd=tmp_path, timeout=600)
    finally:
        leftovers = _kill_marked(token)
    assert NOTEBOOK.read_bytes() == committed
    # The clean-up cell (or, failing that, LocalServer's atexit hook at kernel shutdown) stopped the server.
    assert not leftovers, f"processes left behind by the notebook: {leftovers}"

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells)
    errors = [o for c in code_cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors

    assert "'tiny-llama' at http://127.0.0.1:" in _text(_cell(nb, "start-server"))
    lines = _text(_cell(nb, "generate")).strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        question, answer = line.split(" -> ")
        assert question.startswith("'") and answer.startswith("'")
        assert answer.strip("'\" "), f"no generated text in {line!r}"
    records = _text(_cell(nb, "generate-records"))
    assert "'generations'" in records and "'finish_reasons'" in records and "'output_tokens'" in records
    # The bulk run's progress bar is a widget (ipywidgets is in the test extra), and no cell warns that
    # it could not be one (tqdm's "IProgress not found", printed when ipywidgets is missing).
    bulk = _cell(nb, "bulk")
    assert any(WIDGET in o.get("data", {}) for o in bulk.get("outputs", []) if o["output_type"] == "display_data")
    assert "12 of 12 inputs succeeded" in _text(bulk)
    assert not [c for c in code_cells if "IProgress" in _stderr(c)], [_stderr(c) for c in code_cells]
    table = [o["data"]["text/html"] for o in _cell(nb, "results-table").get("outputs", [])
             if o["output_type"] == "execute_result" and "text/html" in o.get("data", {})]
    assert len(table) == 1 and table[0].startswith("<table>")
    assert table[0].count("<tr>") == 1 + 12 and "<td>Where is the cat?</td>" in table[0]
    agenerate = _text(_cell(nb, "agenerate"))
    assert "'generations': ['" in agenerate
    assert "server running: False" in _text(_cell(nb, "cleanup"))


def test_a_failing_cell_fails_the_run_and_the_kernel_exit_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, standin_server_python: Path
) -> None:
    """A cell raises after a server started: the run fails, the clean-up cell never runs, and still no
    server is left once the kernel has exited (LocalServer's atexit hook). A stand-in server (see the
    conftest) makes this cheap; the real server's group kill is covered in test_local_server.
    """
    from nbclient.exceptions import CellExecutionError

    runner = _load_runner()
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(
            "from vllmclient import LocalServer\n"
            f"server = LocalServer({str(tmp_path)!r}, python={str(standin_server_python)!r}).start()\n"
            "print(server.pid, server.running)"
        ),
        nbformat.v4.new_code_cell("raise RuntimeError('boom from the notebook')"),
        nbformat.v4.new_code_cell("server.stop()"),
    ])
    path = tmp_path / "failing.ipynb"
    nbformat.write(nb, path)
    token = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, token)
    try:
        with pytest.raises(CellExecutionError, match="boom from the notebook"):
            runner.execute_notebook(path, timeout=120)
    finally:
        leftovers = _kill_marked(token)
    assert not leftovers, f"processes left behind by the failed notebook: {leftovers}"
