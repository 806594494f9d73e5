"""The request surface beyond plain text: content parts, removed and unknown fields, tool calls, reasoning,
prompt logprobs, length edges and truncation, request ids, priority, a model per call (issue 8)."""

from __future__ import annotations

import inspect
import warnings

import pytest

from vllmclient import ClientvLLM, InvalidInputError, PromptTooLongError, UnknownFieldWarning


def user(content):
    return [{"role": "user", "content": content}]


def parts(*texts, image=False):
    content = [{"type": "text", "text": text} for text in texts]
    if image:
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
    return content


@pytest.fixture
def llm(fake_vllm, tokenizer_dir):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, max_retries=0) as client:
        yield client


@pytest.fixture
def chat_llm(fake_vllm):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=None, max_retries=0) as client:
        yield client


# -- 1. content parts ---------------------------------------------------------------------------------


def test_text_parts_are_joined_like_vllm_on_the_template_path(llm, fake_vllm):
    outputs = llm.generate([user(parts("first line", "second line")), user("first line\nsecond line")])
    sent = fake_vllm.requests_to("/v1/completions")[0].body["prompt"]
    assert sent[0] == sent[1]  # parts render exactly as the same text in one string
    assert "[{" not in sent[0] and "'type'" not in sent[0]
    assert all("error" not in output for output in outputs)


def test_a_non_text_part_fails_that_input_only_and_says_use_the_chat_path(llm, fake_vllm):
    outputs = llm.generate([user("fine"), user(parts("look", image=True)), user("also fine")])
    assert "error" not in outputs[0] and "error" not in outputs[2]
    error = outputs[1]["error"]
    assert error.type == "InvalidInputError"
    assert "input 1, message 0" in error.message and "'image_url'" in error.message
    assert "tokenizer=None" in error.message
    assert len(fake_vllm.requests_to("/v1/completions")[0].body["prompt"]) == 2


def test_malformed_parts_are_refused_on_both_paths(llm, chat_llm):
    for client in (llm, chat_llm):
        outputs = client.generate([user([{"text": "no type"}]), user([{"type": "text", "text": 3}]), user("ok")])
        assert [("error" in output) for output in outputs] == [True, True, False]
        assert "content part 0" in outputs[0]["error"].message


def test_parts_are_forwarded_unchanged_on_the_chat_path(chat_llm, fake_vllm):
    conversation = user(parts("a", "b"))
    chat_llm.generate([conversation])
    assert fake_vllm.requests_to("/v1/chat/completions")[0].body["messages"] == conversation


# -- 2. removed and unknown request fields -------------------------------------------------------------

GUIDED = ["guided_json", "guided_choice", "guided_regex", "guided_grammar", "guided_decoding_backend",
          "guided_whitespace_pattern"]


@pytest.mark.parametrize("field", GUIDED)
@pytest.mark.parametrize("mode", ["template", "chat"])
def test_removed_guided_fields_are_refused_naming_the_replacement(fake_vllm, tokenizer_dir, field, mode):
    tokenizer = tokenizer_dir if mode == "template" else None
    with (
        ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer) as client,
        pytest.raises(InvalidInputError, match=rf"{field}.*removed.*0\.33\.0.*structured_outputs"),
    ):
        client.generate([user("x")], extra_body={field: ["a", "b"]})
    assert fake_vllm.requests_to("/v1/completions") == fake_vllm.requests_to("/v1/chat/completions") == []


def test_guided_fields_go_through_to_a_server_that_still_reads_them(make_fake_vllm, tokenizer_dir):
    old = make_fake_vllm(version="0.11.2")
    with ClientvLLM(base_url=old.base_url, tokenizer=tokenizer_dir) as client:
        client.generate([user("x")], extra_body={"guided_choice": ["a", "b"]})
    assert old.requests_to("/v1/completions")[0].body["guided_choice"] == ["a", "b"]


def test_a_server_without_version_is_treated_as_current(make_fake_vllm, tokenizer_dir):
    unknown = make_fake_vllm(version="")
    with ClientvLLM(base_url=unknown.base_url, tokenizer=tokenizer_dir) as client:
        with pytest.raises(InvalidInputError, match="guided_json.*unknown"):
            client.generate([user("x")], extra_body={"guided_json": {"type": "object"}})
        assert client.generate_outputs([user("x")])[0][0]


@pytest.mark.parametrize("mode", ["template", "chat"])
def test_an_unknown_extra_body_key_is_warned_about_by_name(fake_vllm, tokenizer_dir, mode):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir if mode == "template" else None) as client:
        with pytest.warns(UnknownFieldWarning, match="'repetiton_penalty'"):
            client.generate([user("x")], extra_body={"repetiton_penalty": 1.1, "top_k": 5})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            client.generate([user("x")], extra_body={"top_k": 5, "bad_words": ["x"]})  # known: no warning


def test_a_chat_only_field_is_refused_on_the_template_path(llm):
    with pytest.raises(InvalidInputError, match="chat_template_kwargs.*only applies to /v1/chat/completions"):
        llm.generate([user("x")], extra_body={"chat_template_kwargs": {"enable_thinking": False}})


def test_chat_template_kwargs_reach_the_client_side_template(llm, fake_vllm, tokenizer_dir):
    formatter = llm._formatter
    formatter.tokenizer.chat_template = "{% if shout %}LOUD {% endif %}{{ messages[0]['content'] }}"
    llm.generate([user("x")], chat_template_kwargs={"shout": True})
    assert fake_vllm.requests_to("/v1/completions")[0].body["prompt"] == ["LOUD x"]


def test_non_finite_numbers_and_lone_surrogates_in_extra_body_fail_the_call_before_sending(llm, fake_vllm):
    for extra in ({"vllm_xargs": {"x": float("nan")}}, {"bad_words": ["caf\udce9"]}):
        with pytest.raises(InvalidInputError, match="extra_body cannot be sent as JSON"):
            llm.generate([user("x")], extra_body=extra)
    assert fake_vllm.requests_to("/v1/completions") == []


# -- 3. nothing the server returns is lost ----------------------------------------------------------


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def test_tool_calls_and_reasoning_reach_the_result(make_fake_vllm):
    server = make_fake_vllm(reasoning_parser=True)
    with ClientvLLM(base_url=server.base_url, tokenizer=None) as client:
        output = client.generate([user("[[w]] weather?")], num_generations=2, tools=TOOLS, tool_choice="auto")[0]
    body = server.requests_to("/v1/chat/completions")[0].body
    assert body["tools"] == TOOLS and body["tool_choice"] == "auto"
    assert output["finish_reasons"] == ["tool_calls", "tool_calls"]
    assert output["generations"] == ["", ""]  # content null: the answer is the call
    calls = output["tool_calls"]
    assert [call[0]["function"]["name"] for call in calls] == ["lookup", "lookup"]
    assert '"text": "w' in calls[0][0]["function"]["arguments"]
    assert output["reasoning"] == ["thinking about choice 0", "thinking about choice 1"]


def test_no_tool_call_and_no_reasoning_keys_when_the_server_sent_none(chat_llm):
    output = chat_llm.generate([user("x")])[0]
    assert "tool_calls" not in output and "reasoning" not in output


def test_tools_on_the_template_path_are_refused_with_the_way_out(llm):
    with pytest.raises(InvalidInputError, match="tools= needs the server's tool-call parser.*tokenizer=None"):
        llm.generate([user("x")], tools=TOOLS)


@pytest.mark.parametrize("mode", ["template", "chat"])
def test_prompt_logprobs_come_back_per_input_per_position(fake_vllm, tokenizer_dir, mode):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir if mode == "template" else None) as client:
        outputs = client.generate([user("[[a]] one two"), user("[[b]] three")], num_generations=2, prompt_logprobs=2)
    for output in outputs:
        positions = output["prompt_logprobs"]
        assert len(positions) == output["statistics"]["input_tokens"][0]
        assert positions[0] is None
        for top in positions[1:]:
            assert 2 <= len(top) <= 3 and all(set(entry) == {"token", "logprob", "rank"} for entry in top)
            # the prompt's own token first (it may rank anywhere), then the alternatives best first, as vLLM sends
            assert [entry["rank"] for entry in top[1:]] == sorted(entry["rank"] for entry in top[1:])
    if mode == "template":
        prompt_ids = client._formatter.tokenizer(client._formatter.render(user("[[a]] one two")),
                                                 add_special_tokens=False)["input_ids"]
        own = [top[0]["token"] for top in outputs[0]["prompt_logprobs"][1:]]
        assert own == [client._formatter.tokenizer.decode([token]) for token in prompt_ids[1:]]
    path = "/v1/completions" if mode == "template" else "/v1/chat/completions"
    assert fake_vllm.requests_to(path)[0].body["prompt_logprobs"] == 2


# -- 4. length checks that agree with the server -------------------------------------------------------


def _prompt_of_tokens(client, tokens):
    """A user message whose rendered prompt has exactly ``tokens`` tokens."""
    formatter = client._formatter
    words = ["a"]
    while formatter.count_tokens(formatter.render(user(" ".join(words)))) < tokens:
        words.append("a")
    conversation = user(" ".join(words))
    assert formatter.count_tokens(formatter.render(conversation)) == tokens
    return conversation


def test_a_prompt_of_exactly_max_model_len_fails_locally(make_fake_vllm, tokenizer_dir):
    server = make_fake_vllm(models=[{"id": "tiny-llama", "max_model_len": 64}])
    with ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir) as client:
        outputs = client.generate([_prompt_of_tokens(client, 64), _prompt_of_tokens(client, 63), user("x")],
                                  max_new_tokens=8)
        with pytest.raises(InvalidInputError, match="max_new_tokens=65 .*max_model_len \\(64\\)"):
            client.generate([user("x")], max_new_tokens=65)
    error = outputs[0]["error"]
    assert error.type == "PromptTooLongError" and "at least one output token" in error.message
    assert "error" not in outputs[1] and "error" not in outputs[2]
    assert len(server.requests_to("/v1/completions")[0].body["prompt"]) == 2


def test_a_no_room_400_naming_max_tokens_fails_only_its_prompt(make_fake_vllm, tokenizer_dir):
    server = make_fake_vllm(models=[{"id": "tiny-llama", "max_model_len": 64}])
    with ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir, pack_size=8) as client:
        exact = _prompt_of_tokens(client, 64)
        client._server.cards[0] = type(client._server.cards[0])("tiny-llama", None, None)  # as if unknown
        outputs = client.generate([user(f"[[p{i}]] x") for i in range(3)] + [exact] + [user(f"[[q{i}]] x") for i in range(4)],
                                  max_new_tokens=8)
    assert [("error" in output) for output in outputs] == [False, False, False, True, False, False, False, False]
    error = outputs[3]["error"]
    assert error.type == "PromptTooLongError" and error.status_code == 400
    assert "no room for a single output token" in error.message and "max_tokens must be at least 1" in error.message
    first = server.requests_to("/v1/completions")[0]
    assert len(first.body["prompt"]) == 8  # one pack was sent, then split


@pytest.mark.parametrize("side", [None, "left"])
def test_truncate_prompt_tokens_is_honoured_by_the_local_check(make_fake_vllm, tokenizer_dir, side):
    server = make_fake_vllm(models=[{"id": "tiny-llama", "max_model_len": 64}])
    with ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir) as client:
        long = _prompt_of_tokens(client, 200)
        extra = {} if side is None else {"truncation_side": side}
        output = client.generate([long], truncate_prompt_tokens=20, max_new_tokens=8, **extra)[0]
        assert "error" not in output, output.get("error")
        assert output["statistics"]["input_tokens"] == [20]
        keep_all = client.generate([long], truncate_prompt_tokens=-1, max_new_tokens=4)[0]
        assert keep_all["statistics"]["input_tokens"] == [63]
        for keep in (64, 65):  # 64 kept tokens leave no room for output; vLLM refuses more than 64
            with pytest.raises(InvalidInputError, match=f"truncate_prompt_tokens={keep} .*no room .*at most 63, or -1"):
                client.generate([long], truncate_prompt_tokens=keep, max_new_tokens=8)
    body = server.requests_to("/v1/completions")[0].body
    assert body["truncate_prompt_tokens"] == 20 and body.get("truncation_side") == side


def test_a_long_chat_prompt_is_a_prompt_too_long_error(make_fake_vllm):
    server = make_fake_vllm(models=[{"id": "tiny-llama", "max_model_len": 64}])
    with ClientvLLM(base_url=server.base_url, tokenizer=None) as client:
        outputs = client.generate([user("word " * 2000), user("x")], max_new_tokens=8)
    error = outputs[0]["error"]
    assert isinstance(error.exception, PromptTooLongError) and error.exception.max_model_len == 64
    assert "characters" in error.message and "truncate_prompt_tokens" in error.message
    assert "error" not in outputs[1]


# -- 7. request ids and priority ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["template", "chat"])
def test_every_result_carries_the_request_id_the_server_saw(fake_vllm, tokenizer_dir, mode):
    fake_vllm.fail_prompts_containing("BROKEN", status=400)
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir if mode == "template" else None,
                    max_retries=0) as client:
        outputs = client.generate([user(f"[[t{i}]] x") for i in range(6)] + [user("BROKEN")])
    paths = ["/v1/completions"] if mode == "template" else ["/v1/chat/completions", "/v1/chat/completions/batch"]
    seen = {request.headers["x-request-id"] for path in paths for request in fake_vllm.requests_to(path)}
    assert all(output["request_id"] in seen for output in outputs)
    assert all(output["request_id"].startswith("vllmclient-") for output in outputs)
    assert outputs[-1]["error"].request_id == outputs[-1]["request_id"]


def test_priority_is_sent(llm, fake_vllm):
    llm.generate([user("x")], priority=-3)
    assert fake_vllm.requests_to("/v1/completions")[0].body["priority"] == -3


# -- 8. a model or adapter per call -------------------------------------------------------------------


def test_a_model_or_adapter_per_call(make_fake_vllm, tokenizer_dir):
    server = make_fake_vllm(models=[{"id": "base", "max_model_len": 512}, {"id": "my-lora", "parent": "base"}])
    with ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir) as client:
        assert client.model_name == "base"
        client.generate([user("x")], model="my-lora")
        client.generate([user("x")])
        with pytest.raises(InvalidInputError, match="model='nope' is not served .*base, my-lora"):
            client.generate([user("x")], model="nope")
    assert [r.body["model"] for r in server.requests_to("/v1/completions")] == ["my-lora", "base"]


# -- the typed parameters -----------------------------------------------------------------------------


def test_agenerate_signature_lists_every_typed_parameter():
    parameters = inspect.signature(ClientvLLM.agenerate).parameters
    for name in ("input", "num_generations", "max_new_tokens", "temperature", "prompt_logprobs", "tools",
                 "tool_choice", "priority", "model", "truncate_prompt_tokens", "extra_body"):
        assert name in parameters
    assert parameters["max_new_tokens"].default == 128 and parameters["temperature"].default == 1.0


def test_a_misspelt_parameter_gets_a_suggestion(llm):
    with pytest.raises(InvalidInputError, match="'temprature' \\(did you mean 'temperature'\\?\\)"):
        llm.generate([user("x")], temprature=0.5)


# -- 5. a tokenizer that does not match the served model ------------------------------------------------


@pytest.fixture
def other_template_dir(tokenizer_dir, tmp_path):
    """The same vocabulary with another chat template: prompts rendered with it are not the server's."""
    import json
    import shutil

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tokenizer_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    return other


def test_a_matching_tokenizer_loads_without_a_word(fake_vllm, tokenizer_dir, caplog):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir):
        pass
    assert not [r for r in caplog.records if "does not match" in r.getMessage()]
    assert fake_vllm.requests_to("/tokenize")[0].body["messages"]


def test_a_mismatched_tokenizer_is_a_warning_naming_both(fake_vllm, other_template_dir, caplog):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=other_template_dir) as client:
        assert client.generate_outputs([user("x")])[0][0]
    (warning,) = [r for r in caplog.records if "does not match" in r.getMessage()]
    assert warning.levelname == "WARNING"
    assert str(other_template_dir) in warning.getMessage() and "'tiny-llama'" in warning.getMessage()


def test_a_mismatched_tokenizer_is_an_error_on_request(fake_vllm, other_template_dir):
    from vllmclient import ConfigurationError

    client = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=other_template_dir, tokenizer_check="error")
    with pytest.raises(ConfigurationError, match="does not match the served model 'tiny-llama'"):
        client.load()
    client.close()
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=other_template_dir, tokenizer_check="off"):
        pass
    assert len(fake_vllm.requests_to("/tokenize")) == 1  # "off" asks nothing


def test_a_server_without_tokenize_is_not_checked(fake_vllm, other_template_dir, caplog):
    fake_vllm.fail_next(404, path="/tokenize")
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=other_template_dir, tokenizer_check="error") as client:
        assert client.generate_outputs([user("x")])[0][0]


def test_generation_params_used_directly_raise_our_error():
    from vllmclient import GenerationParams

    with pytest.raises(InvalidInputError, match="temperature='x' is invalid"):
        GenerationParams(temperature="x")


@pytest.mark.parametrize("mode", ["template", "chat"])
def test_extra_body_may_not_move_the_output_budget(fake_vllm, tokenizer_dir, mode):
    """Found by a fresh pair of eyes: vLLM reads max_completion_tokens in place of max_tokens on the chat path, so
    it silently overrode max_new_tokens and skipped its max_model_len check."""
    tokenizer = tokenizer_dir if mode == "template" else None
    with (
        ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer) as client,
        pytest.raises(InvalidInputError, match="may not set max_completion_tokens.*max_new_tokens"),
    ):
        client.generate([user("x")], max_new_tokens=4, extra_body={"max_completion_tokens": 40})


def test_a_second_bos_through_extra_body_is_refused_on_the_template_path(llm, chat_llm):
    with pytest.raises(InvalidInputError, match="add_special_tokens=True would give the model two BOS"):
        llm.generate([user("x")], extra_body={"add_special_tokens": True})
    assert chat_llm.generate_outputs([user("x")], extra_body={"add_special_tokens": True})[0][0]  # the server's own
