"""The distilabel integration in real distilabel pipelines against the real vLLM server.

Skipped (with the reason) only when distilabel is not installed outside CI; under CI it must run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("CI"):
    import distilabel  # noqa: F401  # CI installs the extra: its absence is a failure, not a skip
else:
    pytest.importorskip("distilabel", reason="distilabel is not installed: pip install 'pyvllmclient[distilabel]'")

from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts
from distilabel.steps.tasks import MagpieGenerator, TextGeneration

from vllmclient import LocalServer
from vllmclient.integrations.distilabel import ClientvLLM

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_global_state")]

QUESTIONS = ["Hello, how are you?", "Tell me about the cat.", "What does Anna like?", "Where is the ball?"]


def test_text_generation_and_magpie_pipelines(vllm_server: LocalServer, vllm_tokenizer_dir: Path,
                                              tmp_path: Path) -> None:
    too_long = " ".join(["word"] * 3000)  # > max_model_len 1024: fails alone, the rest of its batch does not
    rows = [{"instruction": q} for q in QUESTIONS] + [{"instruction": too_long}]
    llm = ClientvLLM(base_url=vllm_server.base_url, tokenizer=str(vllm_tokenizer_dir), max_retries=0,
                     generation_kwargs={"max_new_tokens": 12, "temperature": 0.7})
    with Pipeline(name="vllmclient-real-text", cache_dir=tmp_path / "text") as pipeline:
        generate = TextGeneration(llm=llm, num_generations=2, group_generations=True, input_batch_size=5)
        LoadDataFromDicts(data=rows) >> generate
    table = pipeline.run(use_cache=False)["default"]["train"]
    by_instruction = dict(zip(table["instruction"], table["generation"], strict=True))
    assert by_instruction[too_long] == [None, None]
    for question in QUESTIONS:
        assert len(by_instruction[question]) == 2 and all(isinstance(t, str) for t in by_instruction[question])
    assert set(table["model_name"]) == {vllm_server.served_model_name}
    for instruction, metadata in zip(table["instruction"], table["distilabel_metadata"], strict=True):
        if instruction != too_long:
            stats = [m[f"statistics_{generate.name}"] for m in metadata]
            assert all(s["input_tokens"] > 0 and 0 < s["output_tokens"] <= 12 for s in stats)

    magpie_llm = ClientvLLM(base_url=vllm_server.base_url, tokenizer=str(vllm_tokenizer_dir), max_retries=0,
                            magpie_pre_query_template="llama3", generation_kwargs={"max_new_tokens": 12})
    with Pipeline(name="vllmclient-real-magpie", cache_dir=tmp_path / "magpie") as pipeline:
        MagpieGenerator(llm=magpie_llm, n_turns=2, num_rows=3, batch_size=3)
    table = pipeline.run(use_cache=False)["default"]["train"]
    assert len(table) == 3
    for conversation in table["conversation"]:
        assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
        assert all(isinstance(m["content"], str) for m in conversation)
