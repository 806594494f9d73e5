"""The formatter: tokenizer loading, chat template, BOS handling, validation, Magpie."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from vllmclient import ChatFormatter, ClientvLLM, ConfigurationError, InvalidInputError
from vllmclient.conversation import validate_conversation

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
]


def test_render_is_the_tokenizers_chat_template_with_generation_prompt(tokenizer_dir):
    formatter = ChatFormatter.from_pretrained(tokenizer_dir)
    expected = AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    assert formatter.render(CONVERSATION) == expected
    assert expected.startswith("<|begin_of_text|>")
    assert expected.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_loading_by_path_with_a_revision(tokenizer_dir):
    # A revision is passed through to from_pretrained; for a local folder transformers ignores it.
    formatter = ChatFormatter.from_pretrained(str(tokenizer_dir), revision="main")
    assert formatter.render([{"role": "user", "content": "x"}])


def test_unknown_tokenizer_is_a_clear_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="Could not load the tokenizer 'no-such/repo'.*revision 'v1'"):
        ChatFormatter.from_pretrained("no-such/repo", revision="v1")
    with pytest.raises(ConfigurationError, match="Could not load the tokenizer"):
        ChatFormatter.from_pretrained(tmp_path / "missing")


def test_tokenizer_without_chat_template_fails_at_load(tokenizer_dir, tmp_path, fake_vllm):
    bare = tmp_path / "bare"
    shutil.copytree(tokenizer_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=str(bare))
    with pytest.raises(ConfigurationError, match="no chat template"):
        llm.load()


def test_no_double_bos(fake_vllm, tokenizer_dir):
    """The rendered prompt holds BOS once; we send add_special_tokens=false so vLLM adds no second one."""
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        output = llm.generate([[{"role": "user", "content": "Hello there"}]])[0]
    body = fake_vllm.requests_to("/v1/completions")[-1].body
    assert body["add_special_tokens"] is False
    prompt = body["prompt"][0]
    assert prompt.count("<|begin_of_text|>") == 1
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids.count(tokenizer.bos_token_id) == 1
    # The server's own count equals the single-BOS tokenization.
    assert output["statistics"]["input_tokens"] == [len(ids)]
    # Contrast: what vLLM's default would have counted (two BOS).
    assert len(tokenizer.encode(prompt, add_special_tokens=True)) == len(ids) + 1


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ("hello", "input 3: expected a conversation"),
        ([], "input 3: the conversation is empty"),
        ([{"role": "user"}], "input 3, message 0: the message has no 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}], "input 3, message 1: unknown role 'wizard'"),
        ([{"role": "user", "content": 42}], "input 3, message 0: 'content' must be a str or a list of content parts, got int"),
        (["user: hi"], "input 3, message 0: expected a dict"),
        (None, "input 3: expected a conversation"),
    ],
)
def test_validation_names_input_message_and_fault(conversation, message):
    with pytest.raises(InvalidInputError) as info:
        validate_conversation(conversation, 3)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_magpie_llama3_from_empty_conversation(tokenizer_dir):
    formatter = ChatFormatter.from_pretrained(tokenizer_dir, magpie_pre_query_template="llama3")
    assert formatter.render([]) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"


def test_magpie_after_assistant_turn_opens_a_user_turn(tokenizer_dir):
    formatter = ChatFormatter.from_pretrained(tokenizer_dir, magpie_pre_query_template="llama3")
    conversation = CONVERSATION[:3]
    plain = AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(conversation, tokenize=False)
    prompt = formatter.render(conversation)
    assert prompt == plain + "<|start_header_id|>user<|end_header_id|>\n\n"
    assert prompt.count("<|begin_of_text|>") == 1


def test_magpie_is_not_applied_when_last_turn_is_the_users(tokenizer_dir):
    formatter = ChatFormatter.from_pretrained(tokenizer_dir, magpie_pre_query_template="qwen2")
    plain = ChatFormatter.from_pretrained(tokenizer_dir)
    assert formatter.render(CONVERSATION) == plain.render(CONVERSATION)


def test_magpie_literal_and_qwen2_templates(fake_vllm, tokenizer_dir):
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, use_magpie_template=True,
                     magpie_pre_query_template="qwen2")
    assert llm.magpie_pre_query_template == "<|im_start|>user\n"
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, use_magpie_template=True,
                     magpie_pre_query_template="<<USER>>")
    outputs = llm.generate_outputs([[], [{"role": "system", "content": "Be kind."}]])
    assert all(o[0] is not None for o in outputs)
    prompts = fake_vllm.requests_to("/v1/completions")[-1].body["prompt"]
    assert prompts[0] == "<<USER>>"
    assert prompts[1].endswith("<|eot_id|><<USER>>")
    llm.close()


def test_magpie_needs_a_tokenizer(fake_vllm):
    llm = ClientvLLM(base_url=fake_vllm.base_url, use_magpie_template=True, magpie_pre_query_template="llama3")
    with pytest.raises(ConfigurationError, match="Magpie needs the raw prompt"):
        llm.load()


def test_a_template_that_raises_fails_only_that_input(fake_vllm, tokenizer_dir, tmp_path):
    """Many real templates raise (e.g. 'roles must alternate'); that is the input's error, not the job's."""
    strict = tmp_path / "strict"
    shutil.copytree(tokenizer_dir, strict)
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System messages are not supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}assistant:"
    )
    config = json.loads((strict / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=str(strict)) as llm:
        outputs = llm.generate([[{"role": "user", "content": "[[ok]] hi"}],
                                [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]])
    assert outputs[0]["generations"][0].startswith("ok")
    error = outputs[1]["error"]
    assert error.type == "InvalidInputError"
    assert "input 1: the model's chat template rejected" in error.message
    assert "System messages are not supported" in error.message
