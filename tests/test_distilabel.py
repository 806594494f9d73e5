"""vllmclient's distilabel integration inside real distilabel tasks and pipelines, against the fake server.

Skipped (with the reason) only when distilabel is not installed outside CI; under CI (``$CI`` set) a
missing distilabel fails the module, since ``scripts/setup.sh`` installs the ``distilabel`` extra.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("CI"):
    import distilabel  # noqa: F401  # CI installs the extra: its absence is a failure, not a skip
else:
    pytest.importorskip("distilabel", reason="distilabel is not installed: pip install 'pyvllmclient[distilabel]'")

from distilabel.models.llms.base import LLM, AsyncLLM
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts
from distilabel.steps.tasks import MagpieGenerator, StructuredGeneration, TextGeneration, UltraFeedback
from pydantic import BaseModel, ValidationError

from vllmclient import InvalidInputError, PromptTooLongError
from vllmclient.integrations.distilabel import ClientvLLM

from fake_vllm import FakeVLLM

pytestmark = pytest.mark.usefixtures("restore_global_state")

QUESTIONS = [f"Question {i}: tell me about the number {i}." for i in range(7)]


def make_llm(server: FakeVLLM, tokenizer_dir: Path, **kwargs: Any) -> ClientvLLM:
    return ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir, max_retries=0, **kwargs)


def test_core_package_never_imports_distilabel() -> None:
    code = ("import sys, vllmclient, vllmclient.client, vllmclient.integrations; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'distilabel'], 'distilabel imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_is_a_distilabel_llm_accepted_by_tasks(fake_vllm: FakeVLLM, tokenizer_dir: Path) -> None:
    llm = make_llm(fake_vllm, tokenizer_dir)
    assert isinstance(llm, AsyncLLM) and isinstance(llm, LLM)
    task = TextGeneration(llm=llm)  # distilabel's validation: "a valid dictionary or instance of LLM"
    assert task.llm is llm
    assert llm.get_generation_kwargs() == {}
    assert llm.use_offline_batch_generation is False and llm.structured_output is None


def test_generate_outputs_returns_distilabel_dicts(fake_vllm: FakeVLLM, tokenizer_dir: Path) -> None:
    llm = make_llm(fake_vllm, tokenizer_dir)
    llm.load()
    assert llm.model_name == "tiny-llama"
    inputs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outputs = llm.generate_outputs(inputs, num_generations=2, max_new_tokens=8, temperature=0.7)
    assert len(outputs) == len(inputs)
    for output in outputs:
        assert set(output) == {"generations", "statistics"}  # every other key would become a column
        assert len(output["generations"]) == 2 and all(isinstance(g, str) and g for g in output["generations"])
        assert set(output["statistics"]) == {"input_tokens", "output_tokens"}
        assert all(len(v) == 2 and all(isinstance(n, int) and n > 0 for n in v) for v in output["statistics"].values())
    # the batch was packed: fewer requests than inputs
    assert 1 <= len(fake_vllm.requests_to("/v1/completions")) < len(inputs)
    one = llm.event_loop.run_until_complete(llm.agenerate(inputs[0], num_generations=1, max_new_tokens=4))
    assert set(one) == {"generations", "statistics"} and len(one["generations"]) == 1
    logprobs = llm.generate_outputs(inputs[:2], max_new_tokens=3, logprobs=2)
    assert all(len(o["logprobs"]) == 1 and len(o["logprobs"][0]) == 3 for o in logprobs)
    llm.unload()


def test_a_failed_input_fails_only_itself(fake_vllm: FakeVLLM, tokenizer_dir: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    fake_vllm.fail_prompts_containing("POISON", status=400, message="bad prompt")
    llm = make_llm(fake_vllm, tokenizer_dir)
    llm.load()
    inputs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    inputs[3] = [{"role": "user", "content": "POISON"}]
    with caplog.at_level(logging.WARNING, logger="vllmclient"):
        outputs = llm.generate_outputs(inputs, max_new_tokens=4)
    assert outputs[3]["generations"] == [None]
    assert all(o["generations"][0] for i, o in enumerate(outputs) if i != 3)
    assert "1 of 7 inputs failed" in caplog.text and "bad prompt" in caplog.text
    # one input alone (distilabel's agenerate contract): the failure is raised, as vllmclient's error
    too_long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(PromptTooLongError):
        llm.event_loop.run_until_complete(llm.agenerate(too_long))
    llm.unload()


class Pet(BaseModel):
    name: str
    age: int


def test_structured_output_and_ultrafeedback_task(fake_vllm: FakeVLLM, make_fake_vllm: Any,
                                                  tokenizer_dir: Path) -> None:
    llm = make_llm(fake_vllm, tokenizer_dir, structured_output={"schema": Pet, "format": "json"})
    task = TextGeneration(llm=llm, add_raw_input=False)
    task.load()
    rows = next(task.process([{"instruction": "A pet, as JSON."}, {"instruction": "Another pet."}]))
    for row in rows:
        Pet.model_validate_json(row["generation"])  # vLLM's constrained decoding, checked on the client
        assert set(row) == {"instruction", "generation", "distilabel_metadata", "model_name"}
    assert fake_vllm.requests_to("/v1/completions")[-1].body["structured_outputs"]["json"] == Pet.model_json_schema()
    task.unload()

    long_context = make_fake_vllm(models=[{"id": "tiny-llama", "max_model_len": 8192}])  # UltraFeedback's prompt
    feedback = UltraFeedback(llm=make_llm(long_context, tokenizer_dir, generation_kwargs={"max_new_tokens": 8}))
    feedback.load()
    rows = next(feedback.process([{"instruction": "Say hi.", "generations": ["hi", "hello"]}]))
    assert len(rows) == 1 and rows[0]["model_name"] == "tiny-llama"
    assert "ratings" in rows[0]  # free text from the fake server parses to no ratings: still one row
    assert isinstance(rows[0]["distilabel_metadata"][f"raw_output_{feedback.name}"], str)
    feedback.unload()


def test_settings_are_checked_by_vllmclients_rules() -> None:
    with pytest.raises(ValidationError, match="has no scheme") as info:
        ClientvLLM(base_url="localhost:8000", api_key="sk-very-secret")
    assert "sk-very-secret" not in str(info.value)
    with pytest.raises(ValidationError, match="did you mean 'temperature'"):
        ClientvLLM(generation_kwargs={"temprature": 0.5})
    with pytest.raises(ValidationError, match="Batch API"):
        ClientvLLM(use_offline_batch_generation=True)
    llm = ClientvLLM()
    with pytest.raises(ValidationError, match="max_concurrency"):
        llm.max_concurrency = 0  # on assignment too (set_runtime_parameters assigns)
    with pytest.raises(ValidationError, match="magpie_pre_query_template"):
        ClientvLLM(use_magpie_template=True)


def test_dump_and_from_dict_round_trip_without_secrets(tokenizer_dir: Path) -> None:
    llm = ClientvLLM(base_url="http://127.0.0.1:9/v1", tokenizer=str(tokenizer_dir), api_key="sk-secret",
                     max_concurrency=32, pack_size=4, use_magpie_template=True, magpie_pre_query_template="llama3",
                     default_headers={"X-Team": "a", "Authorization": "Bearer sk-secret"},
                     generation_kwargs={"max_new_tokens": 16, "temperature": 0.5, "stop": ["\n"]})
    data = llm.dump()
    assert "sk-secret" not in repr(data) and "api_key" not in data
    assert data["type_info"] == {"module": "vllmclient.integrations.distilabel", "name": "ClientvLLM"}
    again = LLM.from_dict(dict(data))
    assert type(again) is ClientvLLM
    assert again.dump() == data
    assert again.default_headers == {"X-Team": "a"}
    assert (again.max_concurrency, again.pack_size, again.generation_kwargs) == (32, 4, llm.generation_kwargs)
    assert again.magpie_pre_query_template == llm.magpie_pre_query_template


def test_structured_output_class_is_saved_as_its_json_schema(fake_vllm: FakeVLLM, tokenizer_dir: Path,
                                                             tmp_path: Path) -> None:
    # distilabel writes dumps as JSON/YAML (pipeline.yaml, the cache signature): a model class cannot go there
    llm = make_llm(fake_vllm, tokenizer_dir, structured_output={"schema": Pet, "format": "json", "max_retries": 1})
    data = llm.dump()
    assert data["structured_output"] == {"schema": Pet.model_json_schema(), "format": "json", "max_retries": 1}
    llm.save(tmp_path / "llm.yaml", format="yaml")
    again = LLM.from_yaml(tmp_path / "llm.yaml")
    assert again.structured_output == data["structured_output"]
    output = again.generate_outputs([[{"role": "user", "content": "a pet"}]], max_new_tokens=64)
    Pet.model_validate_json(output[0]["generations"][0])
    again.unload()


def test_a_loaded_dump_takes_its_key_from_the_environment(make_fake_vllm: Any, tokenizer_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_fake_vllm(api_key="sk-server")
    data = make_llm(server, tokenizer_dir, api_key="sk-server").dump()
    assert "api_key" not in data
    monkeypatch.setenv("VLLM_API_KEY", "sk-server")  # as for vllmclient.ClientvLLM: never in the saved file
    again = LLM.from_dict(data)
    again.load()
    assert again.generate_outputs([[{"role": "user", "content": "hi"}]], max_new_tokens=2)[0]["generations"][0]
    again.unload()


def test_changed_setting_rebuilds_the_client(make_fake_vllm: Any, tokenizer_dir: Path) -> None:
    first = make_fake_vllm()
    second = make_fake_vllm(models=[{"id": "other-model", "max_model_len": 1024}])
    llm = make_llm(first, tokenizer_dir, default_headers={"X-Team": "a"})
    llm.load()
    assert llm.model_name == "tiny-llama"
    llm.set_runtime_parameters({"base_url": second.base_url})
    llm.load()
    assert llm.model_name == "other-model"
    llm.generate_outputs([[{"role": "user", "content": "hi"}]], max_new_tokens=2)
    assert second.requests_to("/v1/completions") and not first.requests_to("/v1/completions")
    assert llm.default_headers is not None
    llm.default_headers["X-Team"] = "b"  # changed in place: no assignment, still a new setting
    llm.generate_outputs([[{"role": "user", "content": "hi"}]], max_new_tokens=2)
    assert second.requests_to("/v1/completions")[-1].headers["x-team"] == "b"
    llm.unload()


def test_structured_generation_with_a_schema_per_row(fake_vllm: FakeVLLM, tokenizer_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # distilabel's StructuredInput: (conversation, {"format": ..., "schema": ...}) per row
    person = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    rows = [
        {"instruction": "a pet", "structured_output": {"format": "json", "schema": Pet}},
        {"instruction": "a person", "structured_output": {"format": "json", "schema": person}},
        {"instruction": "another person", "structured_output": {"format": "json", "schema": dict(person)}},
        {"instruction": "another pet", "structured_output": {"format": "json", "schema": Pet.model_json_schema()}},
        {"instruction": "a date [[2024-05]]", "structured_output": {"format": "regex", "schema": r"[0-9]{4}-[0-9]{2}"}},
        {"instruction": "free text", "structured_output": None},
        {"instruction": "broken", "structured_output": {"format": "json", "schema": {"type": "no-such-type"}}},
    ]
    task = StructuredGeneration(llm=make_llm(fake_vllm, tokenizer_dir), add_raw_input=False)
    task.load()
    with caplog.at_level(logging.WARNING, logger="vllmclient"):
        out = next(task.process(rows))
    task.unload()
    generation = {row["instruction"]: row["generation"] for row in out}
    Pet.model_validate_json(generation["a pet"])
    Pet.model_validate_json(generation["another pet"])
    assert set(json.loads(generation["a person"])) == set(json.loads(generation["another person"])) == {"name"}
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}", generation["a date [[2024-05]]"])
    assert isinstance(generation["free text"], str)
    assert generation["broken"] is None  # its own schema is invalid: only this row fails
    assert "1 of 7 inputs failed" in caplog.text and "input 6" in caplog.text  # its index in the batch
    # one bulk run per distinct spec; the two "person" rows (equal schemas) share one packed request
    requests = fake_vllm.requests_to("/v1/completions")
    assert len(requests) == 5
    assert sum(isinstance(r.body["prompt"], list) and len(r.body["prompt"]) == 2 for r in requests) == 1

    llm = make_llm(fake_vllm, tokenizer_dir)  # agenerate takes a structured input too
    message = [{"role": "user", "content": "x"}]
    one = llm.event_loop.run_until_complete(llm.agenerate((message, rows[0]["structured_output"])))
    Pet.model_validate_json(one["generations"][0])
    with pytest.raises(InvalidInputError, match="not a valid JSON schema"):
        llm.event_loop.run_until_complete(llm.agenerate((message, rows[-1]["structured_output"])))
    llm.unload()


def test_client_is_kept_while_settings_stay(fake_vllm: FakeVLLM, tokenizer_dir: Path) -> None:
    # values the core client normalizes (distilabel's model="" default, spaces around base_url) must not
    # look like a changed setting: that would reconnect (GET /v1/models again) on every batch
    llm = ClientvLLM(base_url=f" {fake_vllm.base_url} ", model="", tokenizer=tokenizer_dir, max_retries=0)
    llm.load()
    for _ in range(3):
        llm.generate_outputs([[{"role": "user", "content": "hi"}]], max_new_tokens=2)
    assert len(fake_vllm.requests_to("/v1/models")) == 1
    assert llm.model_name == "tiny-llama"
    llm.unload()


def _run(pipeline: Pipeline, **parameters: Any) -> Any:
    return pipeline.run(use_cache=False, parameters=parameters or None)


def test_pipeline_load_rows_text_generation_magpie(fake_vllm: FakeVLLM, tokenizer_dir: Path, tmp_path: Path) -> None:
    fake_vllm.fail_prompts_containing("POISON", status=400, message="bad prompt")
    rows = [{"instruction": q} for q in QUESTIONS] + [{"instruction": "POISON"}]
    with Pipeline(name="vllmclient-text", cache_dir=tmp_path / "cache") as pipeline:
        load = LoadDataFromDicts(data=rows, batch_size=3)
        generate = TextGeneration(llm=make_llm(fake_vllm, tokenizer_dir, generation_kwargs={"max_new_tokens": 6}),
                                  input_batch_size=5, num_generations=2, group_generations=True)
        load >> generate
    distiset = _run(pipeline, **{generate.name: {"llm": {"generation_kwargs": {"max_new_tokens": 5, "temperature": 0.3}}}})
    table = distiset["default"]["train"]
    generations = dict(zip(table["instruction"], table["generation"], strict=True))
    assert generations.pop("POISON") == [None, None]  # only the failed row; distilabel would null its batch
    assert sorted(generations) == sorted(QUESTIONS)
    assert all(len(g) == 2 and all(isinstance(t, str) and t for t in g) for g in generations.values())
    assert set(table["model_name"]) == {"tiny-llama"}
    for instruction, metadata in zip(table["instruction"], table["distilabel_metadata"], strict=True):
        if instruction == "POISON":
            continue
        stats = [m[f"statistics_{generate.name}"] for m in metadata]
        assert len(stats) == 2 and all(s["input_tokens"] > 0 and s["output_tokens"] > 0 for s in stats)
    bodies = [r.body for r in fake_vllm.requests_to("/v1/completions") if "POISON" not in str(r.body)]
    assert all(b["max_tokens"] == 5 and b["temperature"] == 0.3 for b in bodies)  # the runtime parameters
    assert len(bodies) < len(QUESTIONS)  # each batch packed

    with Pipeline(name="vllmclient-magpie", cache_dir=tmp_path / "cache2") as pipeline:
        MagpieGenerator(llm=make_llm(fake_vllm, tokenizer_dir, magpie_pre_query_template="llama3",
                                     generation_kwargs={"max_new_tokens": 6}),
                        n_turns=2, num_rows=5, batch_size=5)
    fake_vllm.clear()
    table = _run(pipeline)["default"]["train"]
    assert len(table) == 5
    for conversation in table["conversation"]:
        assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in conversation)
    prompts = [b["prompt"] for r in fake_vllm.requests_to("/v1/completions") for b in [r.body]]
    flat = [p for prompt in prompts for p in (prompt if isinstance(prompt, list) else [prompt])]
    assert any(p.endswith("<|start_header_id|>user<|end_header_id|>\n\n") for p in flat)  # Magpie's pre-query


def test_a_list_of_replicas_round_trips_and_shares_the_work(make_fake_vllm: Any, tokenizer_dir: Path) -> None:
    a, b = make_fake_vllm(latency=0.01), make_fake_vllm(latency=0.01)
    data = ClientvLLM(base_url=[a.base_url, b.base_url], tokenizer=tokenizer_dir, max_retries=0, pack_size=1,
                      max_concurrency=4).dump()
    assert data["base_url"] == [a.base_url, b.base_url]
    llm = LLM.from_dict(dict(data))
    llm.load()
    outputs = llm.generate_outputs([[{"role": "user", "content": q}] for q in QUESTIONS * 4], max_new_tokens=4)
    assert len(outputs) == 28 and all(output["generations"][0] for output in outputs)
    assert a.requests_to("/v1/completions") and b.requests_to("/v1/completions")
    llm.unload()
