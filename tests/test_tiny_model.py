"""Tests for the offline tiny-model builder's tokenizer part (no torch needed)."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vllmclient import tiny_model
from vllmclient.tiny_model import (
    BOS,
    CHAT_TEMPLATE,
    END_OF_TEXT,
    EOT,
    SPECIAL_TOKENS,
    build_tokenizer,
    default_model_dir,
    render_chat,
)

SCRIPT = Path(tiny_model.__file__)
FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _assert_same_files(a: Path, b: Path) -> None:
    names_a = sorted(p.name for p in a.iterdir())
    assert names_a == sorted(p.name for p in b.iterdir())
    for name in names_a:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_files_written(tok_dir: Path) -> None:
    for name in FILES:
        assert (tok_dir / name).is_file(), name
    assert (tok_dir / "chat_template.jinja").read_text("utf-8") == CHAT_TEMPLATE
    config = json.loads((tok_dir / "tokenizer_config.json").read_text("utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["bos_token"] == BOS
    assert config["eos_token"] == EOT
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_two_builds_byte_identical(tok_dir: Path, tmp_path: Path) -> None:
    again = build_tokenizer(tmp_path / "again")
    _assert_same_files(tok_dir, again)


def test_build_in_other_process_byte_identical(tok_dir: Path, tmp_path: Path) -> None:
    """By file path, as the launcher runs it; a new process has new hash seeds."""
    out = tmp_path / "script"
    subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--tokenizer-only"],
        check=True, capture_output=True, env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"},
    )
    _assert_same_files(tok_dir, out)


def test_build_is_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    build_tokenizer(tmp_path)
    assert time.monotonic() - started < 3.0


def test_module_top_level_imports_stdlib_only() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tm', {str(SCRIPT)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "heavy = {'tokenizers', 'transformers', 'torch', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_special_tokens_at_end_in_llama3_order(tok_dir: Path) -> None:
    ids = tiny_model.special_token_ids(tok_dir)
    assert list(ids) == list(SPECIAL_TOKENS)
    values = list(ids.values())
    assert values == list(range(values[0], values[0] + len(values)))
    vocab = json.loads((tok_dir / "tokenizer.json").read_text("utf-8"))["model"]["vocab"]
    assert values[0] == len(vocab)
    assert 1200 <= values[-1] + 1 <= 2000


def test_autotokenizer_loads(hf_tokenizer: Any) -> None:
    tok = hf_tokenizer
    assert tok.bos_token == BOS
    assert tok.eos_token == EOT
    assert tok.convert_tokens_to_ids(END_OF_TEXT) == tok.convert_tokens_to_ids(BOS) + 1
    ids = tok("The cat sees a red ball.").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "The cat sees a red ball."
    # Byte-level: any text round-trips.
    text = "Héllo wörld 😀 12345 it's\n\ttabs"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_special_tokens_are_single_ids(hf_tokenizer: Any) -> None:
    text = render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    tokens = hf_tokenizer.convert_ids_to_tokens(
        hf_tokenizer(text, add_special_tokens=False).input_ids
    )
    assert tokens[:2] == [BOS, "<|start_header_id|>"]
    assert tokens.count(EOT) == 1


def test_chat_template_matches_render_chat(hf_tokenizer: Any) -> None:
    pytest.importorskip("jinja2")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "  Tell me about the cat.\n"},
        {"role": "assistant", "content": "The cat sees a red ball."},
        {"role": "wizard", "content": "Any role renders."},
    ]
    for gen_prompt in (False, True):
        rendered = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen_prompt
        )
        assert rendered == render_chat(messages, add_generation_prompt=gen_prompt)
    rendered = hf_tokenizer.apply_chat_template(
        messages[1:2], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTell me about the cat."
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_default_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLMCLIENT_CACHE", str(tmp_path))
    path = default_model_dir()
    assert path.parent == tmp_path
    assert path.name.startswith("tiny-llama-v")
    assert default_model_dir() == path
    assert default_model_dir(train_steps=5) != path
    monkeypatch.delenv("VLLMCLIENT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir().parent == tmp_path / "xdg" / "vllmclient"
