"""Shared pytest fixtures: the tiny tokenizer and a fake vLLM server."""

from __future__ import annotations

import os

# Tests never reach the Hugging Face hub: set before transformers/huggingface_hub read it at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_vllm import FakeVLLM


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama-3-style tokenizer, built once per session."""
    from vllmclient.tiny_model import build_tokenizer

    return Path(build_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer")))


@pytest.fixture
def fake_vllm(tokenizer_dir: Path) -> Iterator[FakeVLLM]:
    """A started FakeVLLM (default model ``tiny-llama``, max_model_len 1024)."""
    with FakeVLLM(tokenizer_dir) as server:
        yield server


@pytest.fixture
def make_fake_vllm(tokenizer_dir: Path) -> Iterator[Callable[..., FakeVLLM]]:
    """A factory for extra fake servers (other models, an API key, latency); all stopped at teardown."""
    servers: list[FakeVLLM] = []

    def make(**kwargs: Any) -> FakeVLLM:
        server = FakeVLLM(tokenizer_dir, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def restore_global_state() -> Iterator[None]:
    """Put the root logger and the signal handlers back as they were. A distilabel pipeline replaces the root
    logger's handlers with a queue handler whose queue it closes at the end (every later INFO log of the
    session became a 'Logging error'), and leaves its SIGINT handler behind (a later Ctrl-C test got a
    BrokenPipeError from it)."""
    import logging
    import signal

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    signals = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for number, handler in signals.items():
        signal.signal(number, handler)
