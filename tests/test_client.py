"""ClientvLLM as a distilabel drop-in: fields, validation, runtime parameters, load, base_url, secrets."""

from __future__ import annotations

import pickle

import pytest

from vllmclient import ClientvLLM, ConfigurationError, ModelNotFoundError


def test_seed_example_verbatim(fake_vllm, tokenizer_dir):
    # The example with only the import changed (and the URL/tokenizer pointed at local ones).
    llm = ClientvLLM(
        base_url=f"{fake_vllm.base_url}/v1",
        tokenizer=str(tokenizer_dir),
    )
    llm.load()
    results = llm.generate_outputs(
        inputs=[[{"role": "user", "content": "Hello, how are you?"}]],
        temperature=0.7,
        top_p=1.0,
        max_new_tokens=256,
    )
    assert len(results) == 1 and len(results[0]) == 1
    assert isinstance(results[0][0], str) and results[0][0]
    body = fake_vllm.requests_to("/v1/completions")[-1].body
    assert body["temperature"] == 0.7 and body["top_p"] == 1.0 and body["max_tokens"] == 256
    assert body["model"] == "tiny-llama"
    llm.close()


def test_defaults_match_distilabel_documentation(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    llm = ClientvLLM()
    assert llm.base_url == "http://localhost:8000"
    assert llm.max_retries == 6
    assert llm.timeout == 120
    assert llm.httpx_client_kwargs is None
    assert llm.tokenizer is None and llm.tokenizer_revision is None
    assert llm.model is None
    assert llm._aclient is None
    assert llm.api_key.get_secret_value() == "EMPTY"


def test_api_key_from_environment_and_never_printed(monkeypatch, fake_vllm, tokenizer_dir):
    monkeypatch.setenv("VLLM_API_KEY", "sk-very-secret")
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir)
    assert llm.api_key.get_secret_value() == "sk-very-secret"
    for text in (repr(llm), str(llm), llm.model_dump_json(), str(llm.model_dump())):
        assert "sk-very-secret" not in text
    llm.generate_outputs([[{"role": "user", "content": "hi"}]])
    assert fake_vllm.requests_to("/v1/completions")[-1].headers["authorization"] == "Bearer sk-very-secret"
    llm.close()


def test_runtime_parameters_are_listed_described_and_settable():
    llm = ClientvLLM()
    names = llm.runtime_parameters_names
    for name in ("base_url", "max_retries", "timeout", "httpx_client_kwargs"):
        assert names[name] is True
    assert names["generation_kwargs"]["max_new_tokens"] is True
    assert "temperature" in names["generation_kwargs"] and "top_k" in names["generation_kwargs"]
    info = {entry["name"]: entry for entry in llm.get_runtime_parameters_info()}
    assert all(info[name]["description"] for name in ("base_url", "max_retries", "timeout", "httpx_client_kwargs"))
    assert {key["name"] for key in info["generation_kwargs"]["keys"]} >= {"max_new_tokens", "seed", "stop"}

    llm.set_runtime_parameters({"base_url": "http://127.0.0.1:9/v1", "max_retries": 1, "timeout": 5,
                                "httpx_client_kwargs": {"trust_env": False},
                                "generation_kwargs": {"max_new_tokens": 8}})
    assert (llm.base_url, llm.max_retries, llm.timeout) == ("http://127.0.0.1:9/v1", 1, 5)
    assert llm.httpx_client_kwargs == {"trust_env": False}
    assert llm.generation_kwargs == {"max_new_tokens": 8}
    llm.set_runtime_parameters({"generation_kwargs": {"temperature": 0.5}})
    assert llm.generation_kwargs == {"temperature": 0.5}  # replaced, as distilabel does
    with pytest.raises(ConfigurationError, match="timeout=-1"):
        llm.set_runtime_parameters({"timeout": -1})


def test_unknown_runtime_parameter_is_skipped_with_a_warning(caplog):
    llm = ClientvLLM()
    with caplog.at_level("WARNING", logger="vllmclient"):
        llm.set_runtime_parameters({"tokenizerr": "x", "max_retries": 2})
    assert llm.max_retries == 2
    assert "'tokenizerr' is not a runtime parameter" in caplog.text


def test_distilabel_saved_configs_load(fake_vllm, tokenizer_dir):
    """distilabel writes model="" and fields that cannot work against vLLM; at their defaults they are fine."""
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, model="", structured_output=None,
                     use_offline_batch_generation=False, offline_batch_generation_block_until_done=None,
                     jobs_ids=None, default_headers={"X-Pipeline": "magpie"})
    assert llm.model is None
    llm.generate_outputs([[{"role": "user", "content": "hi"}]])
    assert llm.model_name == "tiny-llama"
    assert fake_vllm.requests_to("/v1/completions")[-1].headers["x-pipeline"] == "magpie"
    llm.close()
    with pytest.raises(ConfigurationError, match="use_offline_batch_generation=True is not supported.*checkpoint"):
        ClientvLLM(use_offline_batch_generation=True)


def test_copies_share_nothing_at_run_time(fake_vllm, tokenizer_dir):
    import copy

    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir)
    llm.load()
    for clone in (llm.model_copy(), copy.deepcopy(llm), llm.model_copy(update={"max_retries": 1})):
        assert clone._aclient is None and clone._loop is not llm._loop
        assert clone.generate_outputs([[{"role": "user", "content": "[[c]] hi"}]])[0][0].startswith("c")
        clone.close()
    assert llm.generate_outputs([[{"role": "user", "content": "[[o]] hi"}]])[0][0].startswith("o")
    llm.close()


def test_strict_failure_survives_pickling():
    from vllmclient import GenerationError, GenerationFailedError

    error = GenerationFailedError([GenerationError(index=2, type="X", message="m")], 5, results=[{"a": 1}])
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.total, clone.results, clone.failures[0].index, str(clone)) == (5, [{"a": 1}], 2, str(error))


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_base_url_with_and_without_v1(fake_vllm, tokenizer_dir, suffix):
    with ClientvLLM(base_url=fake_vllm.base_url + suffix, tokenizer=tokenizer_dir) as llm:
        assert llm.generate_outputs([[{"role": "user", "content": "hi"}]])[0][0]
    assert {r.path for r in fake_vllm.requests} == {"/v1/models", "/version", "/tokenize", "/v1/completions"}


def test_load_is_idempotent_and_discovers_model(fake_vllm, tokenizer_dir):
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir)
    llm.load()
    llm.load()
    assert len(fake_vllm.requests_to("/v1/models")) == 1
    assert llm.model_name == "tiny-llama"
    assert llm.max_model_len == 1024
    assert llm._aclient is not None
    llm.close()


def test_changing_base_url_after_load_reconnects(fake_vllm, tokenizer_dir, make_fake_vllm):
    other = make_fake_vllm(models=[{"id": "other", "max_model_len": 512}])
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir)
    llm.load()
    llm.set_runtime_parameters({"base_url": other.base_url})
    llm.generate_outputs([[{"role": "user", "content": "hi"}]])
    assert llm.model_name == "other" and llm.max_model_len == 512
    assert other.requests_to("/v1/completions")
    llm.close()


def test_explicit_model_must_be_served(make_fake_vllm, tokenizer_dir):
    server = make_fake_vllm(models=[{"id": "base", "max_model_len": 1024}, {"id": "lora-a", "parent": "base"}])
    with pytest.raises(ModelNotFoundError) as info:
        ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir, model="nope").load()
    assert "base" in str(info.value) and "lora-a" in str(info.value)
    assert info.value.served_models == ["base", "lora-a"]


def test_base_model_chosen_among_lora_adapters(make_fake_vllm, tokenizer_dir):
    server = make_fake_vllm(models=[{"id": "lora-a", "parent": "base"}, {"id": "base", "max_model_len": 777}])
    with ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir) as llm:
        assert llm.model_name == "base" and llm.max_model_len == 777
    with ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir, model="lora-a") as llm:
        llm.generate_outputs([[{"role": "user", "content": "hi"}]])
        assert llm.model_name == "lora-a" and llm.max_model_len == 777  # the adapter inherits the base's length
        assert server.requests_to("/v1/completions")[-1].body["model"] == "lora-a"


def test_several_base_models_need_a_choice(make_fake_vllm, tokenizer_dir):
    server = make_fake_vllm(models=[{"id": "a", "max_model_len": 10}, {"id": "b", "max_model_len": 10}])
    with pytest.raises(ConfigurationError, match="several models .*a, b.*model="):
        ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir).load()


def test_generate_loads_on_first_use_and_close_releases(fake_vllm, tokenizer_dir):
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir)
    assert llm.generate_outputs([[{"role": "user", "content": "hi"}]])[0][0]
    llm.close()
    assert llm._aclient is None
    # Usable again after close: it reconnects.
    assert llm.generate_outputs([[{"role": "user", "content": "hi"}]])[0][0]
    llm.close()


def test_client_can_be_pickled_before_and_after_load(fake_vllm, tokenizer_dir):
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, max_retries=2)
    llm.load()
    clone = pickle.loads(pickle.dumps(llm))
    assert clone.max_retries == 2 and clone._aclient is None
    assert clone.generate_outputs([[{"role": "user", "content": "hi"}]])[0][0]
    clone.close()
    llm.close()
