"""Execute a notebook in a fresh ipykernel running *this* interpreter, and save it with its outputs.

    .venv/bin/python examples/execute_notebook.py                      # refresh examples/quickstart.ipynb
    .venv/bin/python examples/execute_notebook.py NB.ipynb -o OUT.ipynb

The kernel is always ``sys.executable -m ipykernel_launcher`` (a kernelspec written to a temporary
folder), never whatever "python3" kernel happens to be installed, so the notebook imports the same
vllmclient as the caller. A cell that raises stops the run with a non-zero exit code and nothing is
written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent
DEFAULT_NOTEBOOK = HERE / "quickstart.ipynb"
KERNEL_NAME = "python3"


def execute_notebook(
    path: str | Path, *, cwd: str | Path | None = None, timeout: float = 600
) -> nbformat.NotebookNode:
    """Run every cell of ``path`` in a new kernel on ``sys.executable``; return the executed notebook.

    Raises ``nbclient.exceptions.CellExecutionError`` if a cell fails. The kernel is shut down either way,
    politely first, so the notebook's atexit hooks (LocalServer's, which stops its server) run.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="vllmclient-kernels-") as kernels:
        # argv: [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        write_kernel_spec(Path(kernels) / KERNEL_NAME)
        specs = KernelSpecManager(kernel_dirs=[kernels])
        km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
        argv = km.kernel_spec.argv if km.kernel_spec is not None else []
        if not argv or Path(argv[0]) != Path(sys.executable):
            raise RuntimeError(f"kernelspec runs {argv[:1]}, not {sys.executable}")
        # Time for the kernel's atexit hooks (LocalServer.stop waits up to 10 s) before it is killed.
        km.shutdown_wait_time = 30
        client = NotebookClient(
            nb,
            km=km,
            kernel_name=KERNEL_NAME,
            timeout=timeout,
            resources={"metadata": {"path": str(cwd or path.parent)}},
        )
        try:
            client.execute()
        finally:
            # nbclient leaves a kernel it did not create running: shut it down (a shutdown_request first).
            if client.kc is not None:
                client.kc.stop_channels()
            if km.has_kernel:
                km.shutdown_kernel(now=False)
            km.cleanup_resources()
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", nargs="?", default=str(DEFAULT_NOTEBOOK))
    parser.add_argument("-o", "--output", help="where to write the executed notebook (default: in place)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per cell (default 600)")
    args = parser.parse_args(argv)
    try:
        nb = execute_notebook(args.notebook, timeout=args.timeout)
    except CellExecutionError as exc:
        print(f"error: {args.notebook} failed:\n{exc}", file=sys.stderr)
        return 1
    out = Path(args.output or args.notebook)
    nbformat.write(nb, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
