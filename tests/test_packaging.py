"""What the source distribution ships: the declared licence's text, and tests that can run from it.

The sdist is built here with the installed setuptools (``setup.py sdist``, offline, into a temporary
folder), the way ``python -m build --sdist`` builds it, and compared with the files on disk.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out), "sdist", "--dist-dir", str(out)],
        cwd=ROOT, check=True, capture_output=True,
    )
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = [member.name for member in tar.getmembers() if member.isfile()]
    return {name.split("/", 1)[1] for name in names}


def _files(*folders: str) -> set[str]:
    """The files under these folders (bytecode aside): from a clone, or from an unpacked sdist."""
    return {
        path.relative_to(ROOT).as_posix()
        for folder in folders
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_license_file_is_the_declared_licence() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["license"] == "Apache-2.0"
    assert config["metadata"]["license_files"].split() == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_sdist_ships_the_licence_and_runnable_tests(sdist_files: set[str]) -> None:
    assert "LICENSE" in sdist_files
    # Every test module and what the tests load: conftests, the fake server, the benchmark the load
    # test drives, the notebook and its runner, the vLLM setup script, the linters' configuration.
    needed = _files("tests", "benchmarks", "examples", "scripts") | {"ruff.toml", "setup.cfg"}
    missing = needed - sdist_files
    assert not missing, f"the sdist lacks files its tests need: {sorted(missing)}"
    assert not [name for name in sdist_files if "__pycache__" in name or name.endswith(".pyc")]
