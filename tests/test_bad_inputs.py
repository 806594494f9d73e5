"""Bad input of every kind (issue 9, item 11): one table row per kind, each a test.

Three tables, by where the fault lies:

* ``BAD_CONVERSATIONS``: one input of a batch is malformed. Only that input fails (the others come
  back), on both paths: the client-side template (``tokenizer=...`` → /v1/completions) and the
  server's (``tokenizer=None`` → /v1/chat/completions); ``agenerate`` raises the same error.
* ``BAD_CALLS``: a parameter or argument of the call is wrong. The call raises before anything is
  sent (the fake server sees no generation request).
* ``BAD_SETTINGS``: a ``ClientvLLM`` field is wrong: ``ConfigurationError`` at construction or load.

Every message must name the input (index, message) or the parameter, say what is wrong and how to fix
it (the row's words), and never read as the server's fault.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from vllmclient import (
    ClientvLLM,
    ConfigurationError,
    GenerationFailedError,
    InvalidInputError,
    ModelNotFoundError,
    PromptTooLongError,
    VLLMClientError,
)

from fake_vllm import FakeVLLM

try:
    import numpy
except ImportError:  # numpy is optional: its rows are left out without it
    numpy = None

NAN, INF = math.nan, math.inf
BOTH = ("template", "chat")
TEMPLATE, CHAT = ("template",), ("chat",)
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
LONG = "word " * 3000  # far past the fake's max_model_len of 1024 tokens


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def calling(arguments: Any) -> list[dict[str, Any]]:
    """A conversation whose assistant turn holds a tool call with these (dict) arguments."""
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}
    return [user("weather?")[0], {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


def row(id_: str, value: Any, *words: str, error: type[Exception] = InvalidInputError,
        paths: tuple[str, ...] = BOTH, waits: str | None = None) -> Any:
    """One kind of bad input: what is passed, the error it must raise, the words its message must hold."""
    marks = [pytest.mark.xfail(strict=True, reason=f"waits for {waits}")] if waits else []
    return pytest.param(value, error, words, paths, id=id_, marks=marks)


def per_path(rows: list[Any]) -> list[Any]:
    """Each row once per path it applies to, as ``(path, value, error, words)``."""
    return [
        pytest.param(path, *row.values[:3], id=f"{path}-{row.id}", marks=row.marks)
        for row in rows for path in row.values[3]
    ]


def fresh(value: Any) -> Any:
    """Rows hold single-use values (generators) as factories."""
    return value() if callable(value) else value


# -- the tables --------------------------------------------------------------------------------------

BAD_CONVERSATIONS = [
    # the conversation itself
    row("int", 42, "input 1", "got int", "list of {'role': ..., 'content': ...} dicts"),
    row("str", "hello", "input 1", "got str", "[{'role': 'user', 'content': text}]"),
    row("bytes", b"hello", "input 1", "got bytes", "[{'role': 'user', 'content': text}]"),
    row("a-single-message", {"role": "user", "content": "hi"}, "input 1", "got dict", "a single message",
        "in a list"),
    row("None", None, "input 1", "got None", "list of {'role': ..., 'content': ...} dicts"),
    row("empty", [], "input 1", "empty", "at least one message"),
    row("a-generator", lambda: (m for m in user("hi")), "input 1", "got generator", "list("),
    row("a-set", {"a", "b"}, "input 1", "got set", "list of {'role': ..., 'content': ...} dicts"),
    # its messages
    row("message-str", ["hello"], "input 1, message 0", "got str", "{'role': 'user', 'content': 'hello'}"),
    row("message-None", [None], "input 1, message 0", "got None", "'role' and 'content'"),
    row("nested-list", [user("hi")], "input 1, message 0", "got list", "nested", "flatten"),
    row("role-missing", [{"content": "hi"}], "input 1, message 0", "no 'role'", "'user'"),
    row("role-None", [{"role": None, "content": "hi"}], "input 1, message 0", "role None", "use one of"),
    row("role-unknown", [{"role": "robot", "content": "hi"}], "input 1, message 0", "'robot'", "use one of"),
    row("role-misspelt", [{"role": "asistant", "content": "hi"}], "input 1, message 0", "'asistant'",
        "did you mean 'assistant'"),
    row("role-capitalised", [{"role": "User", "content": "hi"}], "input 1, message 0", "did you mean 'user'"),
    row("role-unhashable", [{"role": ["user"], "content": "hi"}], "input 1, message 0", "['user']",
        "use one of"),
    row("content-missing", [{"role": "user"}], "input 1, message 0", "no 'content'", "'content': text"),
    row("content-None", user(None), "input 1, message 0", "got None", "str"),
    row("content-int", user(5), "input 1, message 0", "got int", "str(...)"),
    row("content-bytes", user(b"hi"), "input 1, message 0", "got bytes", ".decode("),
    row("content-a-single-part", user({"type": "text", "text": "hi"}), "input 1, message 0", "got dict",
        "in a list"),
    # content parts
    row("part-str", user(["hi"]), "input 1, message 0, content part 0", "{'type': 'text', 'text': '...'}"),
    row("part-no-type", user([{"text": "hi"}]), "input 1, message 0, content part 0", "'type'"),
    row("part-text-not-str", user([{"type": "text", "text": 5}]), "input 1, message 0, content part 0",
        "{'type': 'text', 'text': '...'}"),
    row("part-nested-list", user([["hi"]]), "input 1, message 0, content part 0", "{'type': 'text'"),
    row("part-image-on-the-template-path", user([{"type": "image_url", "image_url": {"url": "data:,"}}]),
        "input 1, message 0", "'image_url'", "tokenizer=None", paths=TEMPLATE),
    # what JSON or UTF-8 cannot carry
    row("lone-surrogate", user("caf\udce9"), "input 1, message 0", "'\\udce9'", "lone surrogate", "errors="),
    row("lone-surrogate-in-a-long-prompt", user(LONG + "caf\udce9"), "input 1, message 0", "'\\udce9'",
        "lone surrogate"),
    row("lone-surrogate-in-a-later-message", [{"role": "system", "content": "ok"}, *user("caf\udce9")],
        "input 1, message 1", "lone surrogate"),
    row("lone-surrogate-in-a-part", user([{"type": "text", "text": "caf\udce9"}]), "input 1, message 0",
        "lone surrogate"),
    row("NaN-in-tool-call-arguments", calling({"x": NAN}), "input 1, message 1", "NaN", "finite numbers"),
    row("infinity-in-tool-call-arguments", calling({"x": -INF}), "input 1, message 1", "finite numbers"),
    row("a-set-in-tool-call-arguments", calling({"ids": {1, 2}}), "input 1, message 1", "set",
        "lists and dicts"),
    # too long for the model (known on the client only on the template path)
    row("too-long", user(LONG), "input 1", "tokens", "1024", "truncate_prompt_tokens",
        error=PromptTooLongError, paths=TEMPLATE),
]
if numpy is not None:
    BAD_CONVERSATIONS += [  # arrays are converted (see test_arrays_and_mappings_are_conversations): what they hold
        row("numpy-array-of-str", numpy.array(["hello"]), "input 1, message 0", "got str", "'role': 'user'"),
        row("numpy-array-of-str-as-content", user(numpy.array(["hi"])), "input 1, message 0, content part 0",
            "{'type': 'text', 'text': '...'}"),
        row("numpy-scalar", numpy.int64(3), "input 1", "got numpy.int64", "list of {'role': ..., 'content': ...}"),
    ]

DIRECTORY = "<a directory>"  # replaced by the test's tmp_path


def _raises_at_once() -> Iterator[Any]:
    raise OSError("the dataset file is gone")
    yield  # a generator


BAD_CALLS = [
    # the inputs argument
    row("inputs-str", {"inputs": "hello"}, "inputs", "got str", "list"),
    row("inputs-a-single-conversation-dict", {"inputs": {"role": "user", "content": "hi"}}, "inputs",
        "got dict"),
    row("inputs-None", {"inputs": None}, "inputs", "got None"),
    row("inputs-int", {"inputs": 3}, "inputs", "got int"),
    row("inputs-bytes", {"inputs": b"hi"}, "inputs", "got bytes"),
    row("inputs-a-generator-that-raises", {"inputs": _raises_at_once}, "inputs", "raised", "OSError",
        "the dataset file is gone", "input 0"),
    # num_generations, and the other arguments of generate
    row("num_generations-0", {"num_generations": 0}, "num_generations=0", "int >= 1"),
    row("num_generations-negative", {"num_generations": -2}, "num_generations=-2", "int >= 1"),
    row("num_generations-str", {"num_generations": "2"}, "num_generations='2'", "int >= 1"),
    row("num_generations-float", {"num_generations": 2.0}, "num_generations=2.0", "int >= 1"),
    row("num_generations-bool", {"num_generations": True}, "num_generations=True", "int >= 1"),
    row("num_generations-None", {"num_generations": None}, "num_generations=None", "int >= 1"),
    row("num_generations-with-greedy", {"num_generations": 3, "temperature": 0}, "num_generations=3",
        "temperature=0", "greedy"),
    row("strict-str", {"strict": "no"}, "strict='no'", "True or False"),
    row("progress-str", {"progress": "off"}, "progress='off'", "True, False or None"),
    row("checkpoint-a-directory", {"checkpoint": DIRECTORY}, "checkpoint", "is a directory",
        error=ConfigurationError),
    row("checkpoint-int", {"checkpoint": 5}, "checkpoint", "int", error=ConfigurationError),
    # unknown keyword arguments
    row("typo-temprature", {"temprature": 0.5}, "'temprature'", "did you mean 'temperature'"),
    row("typo-max_token", {"max_token": 5}, "'max_token'", "did you mean 'max_new_tokens'"),
    row("openai-name-max_tokens", {"max_tokens": 5}, "'max_tokens'", "max_new_tokens"),
    row("openai-name-n", {"n": 2}, "'n'", "num_generations"),
    row("openai-name-top_logprobs", {"top_logprobs": 2}, "'top_logprobs'", "logprobs"),
    row("stream", {"stream": True}, "'stream'", "stream(...) or astream(...)", "aiter_generate"),
    # every generation parameter: wrong types, ranges and empties
    row("max_new_tokens-0", {"max_new_tokens": 0}, "max_new_tokens=0", "greater than or equal to 1", "int >= 1"),
    row("max_new_tokens-str", {"max_new_tokens": "128"}, "max_new_tokens='128'", "valid integer"),
    row("max_new_tokens-float", {"max_new_tokens": 12.5}, "max_new_tokens=12.5", "valid integer"),
    row("max_new_tokens-bool", {"max_new_tokens": True}, "max_new_tokens=True", "valid integer"),
    row("max_new_tokens-None", {"max_new_tokens": None}, "max_new_tokens=None", "valid integer"),
    row("max_new_tokens-over-the-context", {"max_new_tokens": 5000}, "max_new_tokens=5000", "max_model_len",
        "1024"),
    row("frequency_penalty-out-of-range", {"frequency_penalty": 2.5}, "frequency_penalty=2.5", "[-2, 2]"),
    row("frequency_penalty-NaN", {"frequency_penalty": NAN}, "frequency_penalty=nan", "finite number"),
    row("frequency_penalty-None", {"frequency_penalty": None}, "frequency_penalty=None", "[-2, 2]"),
    row("presence_penalty-infinity", {"presence_penalty": -INF}, "presence_penalty=-inf", "finite number"),
    row("logit_bias-NaN", {"logit_bias": {"5": NAN}}, "logit_bias", "finite number"),
    row("logit_bias-a-word-as-key", {"logit_bias": {"hello": 1.0}}, "logit_bias", "'hello'", "token id"),
    row("logit_bias-a-list", {"logit_bias": [5, 1.0]}, "logit_bias=[5, 1.0]", "valid dictionary"),
    row("logit_bias-str-bias", {"logit_bias": {"5": "1"}}, "logit_bias", "valid number"),
    row("temperature-infinity", {"temperature": INF}, "temperature=inf", "finite number"),
    row("temperature-NaN", {"temperature": NAN}, "temperature=nan", "finite number"),
    row("temperature-negative", {"temperature": -0.5}, "temperature=-0.5", "[0, 2]"),
    row("temperature-over-2", {"temperature": 2.5}, "temperature=2.5", "[0, 2]"),
    row("temperature-str", {"temperature": "0.7"}, "temperature='0.7'", "valid number"),
    row("temperature-None", {"temperature": None}, "temperature=None", "valid number"),
    row("top_p-0", {"top_p": 0}, "top_p=0", "(0, 1]"),
    row("top_p-over-1", {"top_p": 1.5}, "top_p=1.5", "(0, 1]"),
    row("top_k-below-minus-1", {"top_k": -2}, "top_k=-2", ">= -1"),
    row("top_k-float", {"top_k": 2.5}, "top_k=2.5", "valid integer"),
    row("min_p-over-1", {"min_p": 1.5}, "min_p=1.5", "[0, 1]"),
    row("repetition_penalty-0", {"repetition_penalty": 0}, "repetition_penalty=0", "> 0"),
    row("repetition_penalty-infinity", {"repetition_penalty": INF}, "repetition_penalty=inf", "finite"),
    row("seed-str", {"seed": "42"}, "seed='42'", "valid integer"),
    row("seed-beyond-int64", {"seed": 2**64}, "seed=18446744073709551616", "64-bit"),
    row("stop-int", {"stop": 5}, "stop=5", "A non-empty str, or a list of them"),
    row("stop-list-of-int", {"stop": [1, 2]}, "stop=[1, 2]", "A non-empty str, or a list of them"),
    row("stop-empty-str", {"stop": ""}, "stop=''", "empty"),
    row("stop-empty-str-in-list", {"stop": ["a", ""]}, "stop=['a', '']", "empty"),
    row("stop-lone-surrogate", {"stop": ["caf\udce9"]}, "stop", "lone surrogate"),
    row("stop_token_ids-str", {"stop_token_ids": "1"}, "stop_token_ids='1'", "valid list"),
    row("stop_token_ids-negative", {"stop_token_ids": [-1]}, "stop_token_ids=[-1]", "token ids"),
    row("include_stop_str_in_output-str", {"include_stop_str_in_output": "yes"},
        "include_stop_str_in_output='yes'", "valid boolean"),
    row("min_tokens-negative", {"min_tokens": -1}, "min_tokens=-1", ">= 0"),
    row("min_tokens-over-max_new_tokens", {"min_tokens": 200, "max_new_tokens": 100}, "min_tokens=200",
        "max_new_tokens=100"),
    row("ignore_eos-int", {"ignore_eos": 1}, "ignore_eos=1", "valid boolean"),
    row("skip_special_tokens-str", {"skip_special_tokens": "false"}, "skip_special_tokens='false'",
        "valid boolean"),
    row("logprobs-negative", {"logprobs": -1}, "logprobs=-1", ">= 0"),
    row("logprobs-str", {"logprobs": "5"}, "logprobs='5'", "valid integer"),
    row("prompt_logprobs-negative", {"prompt_logprobs": -2}, "prompt_logprobs=-2", ">= 0"),
    row("truncate_prompt_tokens-0", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens=0", "use -1"),
    row("truncate_prompt_tokens-below-minus-1", {"truncate_prompt_tokens": -2}, "truncate_prompt_tokens=-2",
        "greater than or equal to -1"),
    row("truncate_prompt_tokens-over-the-context", {"truncate_prompt_tokens": 5000},
        "truncate_prompt_tokens=5000", "max_model_len", "or -1"),
    row("truncation_side-unknown", {"truncation_side": "middle"}, "truncation_side='middle'", "'left'"),
    row("chat_template_kwargs-str", {"chat_template_kwargs": "enable_thinking"},
        "chat_template_kwargs='enable_thinking'", "valid dictionary"),
    row("chat_template_kwargs-NaN", {"chat_template_kwargs": {"x": NAN}}, "chat_template_kwargs", "NaN",
        "finite numbers"),
    row("chat_template_kwargs-lone-surrogate", {"chat_template_kwargs": {"x": "caf\udce9"}},
        "chat_template_kwargs", "lone surrogate"),
    row("tools-on-the-template-path", {"tools": TOOLS}, "tools=", "tokenizer=None", paths=TEMPLATE),
    row("tools-str", {"tools": "lookup"}, "tools='lookup'", "valid list"),
    row("tools-empty", {"tools": []}, "tools=[]", "at least one tool", "tools=None", paths=CHAT),
    row("tools-without-a-name", {"tools": [{"type": "function", "function": {}}]}, "tools", "tool 0",
        "'name'", paths=CHAT),
    row("tools-not-functions", {"tools": [{"type": "web_search"}]}, "tools", "tool 0", "'function'",
        paths=CHAT),
    row("tools-NaN", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"max": INF}}}]},
        "tools", "finite numbers", paths=CHAT),
    row("tool_choice-unknown", {"tool_choice": "sometimes"}, "tool_choice='sometimes'", "'auto'"),
    row("tool_choice-without-tools", {"tool_choice": "required"}, "tool_choice='required'", "tools=",
        paths=CHAT),
    row("tool_choice-names-no-tool", {"tools": TOOLS, "tool_choice": {"type": "function",
                                                                        "function": {"name": "nope"}}},
        "tool_choice", "'nope'", "lookup", paths=CHAT),
    row("model-int", {"model": 5}, "model=5", "valid string"),
    row("model-empty", {"model": ""}, "model=''", "Served: tiny-llama"),
    row("model-not-served", {"model": "gpt-4"}, "model='gpt-4'", "Served: tiny-llama"),
    row("priority-str", {"priority": "high"}, "priority='high'", "valid integer"),
    row("priority-beyond-int64", {"priority": 2**70}, "priority=", "64-bit"),
    row("extra_body-str", {"extra_body": "top_k=5"}, "extra_body='top_k=5'", "valid dictionary"),
    row("extra_body-NaN", {"extra_body": {"vllm_xargs": {"x": NAN}}}, "extra_body", "finite numbers"),
    row("extra_body-sets-n", {"extra_body": {"n": 2}}, "extra_body may not set n", "num_generations"),
    row("extra_body-sampling-parameter-out-of-range", {"extra_body": {"temperature": 5}}, "extra_body",
        "temperature=5", "[0, 2]"),
    row("extra_body-empty-stop", {"extra_body": {"stop": [""]}}, "extra_body", "stop=['']", "empty"),
    row("extra_body-and-parameter-both-set", {"temperature": 0.5, "extra_body": {"temperature": 0.9}},
        "temperature given twice", "extra_body", "temperature=..."),
    row("extra_body-guided_json", {"extra_body": {"guided_json": {"type": "object"}}}, "guided_json",
        "structured_outputs"),
    # structured outputs
    row("structured_outputs-two-kinds", {"structured_outputs": {"regex": "a+", "choice": ["a"]}},
        "structured_outputs", "one"),
    row("structured_outputs-empty-choice", {"structured_outputs": {"choice": []}}, "structured_outputs",
        "choice", "empty"),
]

NO_TEMPLATE = "<a tokenizer without a chat template>"  # replaced by a copy of the tiny tokenizer without one

BAD_SETTINGS = [
    row("model-int", {"model": 5}, "model=5", error=ConfigurationError),
    row("model-not-served", {"model": "gpt-4"}, "'gpt-4'", "Served models: tiny-llama", error=ModelNotFoundError),
    row("base_url-no-scheme", {"base_url": "localhost:8000"}, "base_url", "'localhost:8000'", "http://",
        error=ConfigurationError),
    row("base_url-empty", {"base_url": ""}, "base_url", "http://localhost:8000/v1", error=ConfigurationError),
    row("base_url-int", {"base_url": 8000}, "base_url=8000", error=ConfigurationError),
    row("api_key-int", {"api_key": 5}, "api_key", error=ConfigurationError),
    row("max_retries-negative", {"max_retries": -1}, "max_retries=-1", error=ConfigurationError),
    row("max_retries-str", {"max_retries": "many"}, "max_retries='many'", error=ConfigurationError),
    row("timeout-0", {"timeout": 0}, "timeout=0", error=ConfigurationError),
    row("timeout-str", {"timeout": "fast"}, "timeout='fast'", error=ConfigurationError),
    row("timeout-NaN", {"timeout": NAN}, "timeout=nan", error=ConfigurationError),
    row("httpx_client_kwargs-str", {"httpx_client_kwargs": "verify=False"}, "httpx_client_kwargs",
        error=ConfigurationError),
    row("httpx_client_kwargs-typo", {"httpx_client_kwargs": {"verfy": False}}, "'verfy'", "did you mean 'verify'",
        error=ConfigurationError),
    row("default_headers-int-value", {"default_headers": {"X-Team": 5}}, "default_headers['X-Team']=5",
        error=ConfigurationError),
    row("tokenizer-int", {"tokenizer": 5}, "tokenizer=5", error=ConfigurationError),
    row("tokenizer-missing", {"tokenizer": "/nonexistent/tokenizer"}, "'/nonexistent/tokenizer'",
        "Check the repo id or path", error=ConfigurationError),
    row("tokenizer-without-chat-template", {"tokenizer": NO_TEMPLATE}, "no chat template", "tokenizer=None",
        error=ConfigurationError),
    row("tokenizer_revision-int", {"tokenizer_revision": 5}, "tokenizer_revision=5", error=ConfigurationError),
    row("trust_remote_code-str", {"trust_remote_code": "maybe"}, "trust_remote_code='maybe'", "True or False",
        error=ConfigurationError),
    row("use_magpie_template-str", {"use_magpie_template": "maybe"}, "use_magpie_template='maybe'",
        error=ConfigurationError),
    row("use_magpie_template-without-a-template", {"use_magpie_template": True, "tokenizer": "x"},
        "magpie_pre_query_template", "'llama3'", error=ConfigurationError),
    row("use_magpie_template-on-the-chat-path", {"use_magpie_template": True, "magpie_pre_query_template": "qwen2"},
        "Magpie", "tokenizer=", error=ConfigurationError),
    row("magpie_pre_query_template-int", {"magpie_pre_query_template": 5}, "magpie_pre_query_template=5",
        error=ConfigurationError),
    row("max_concurrency-0", {"max_concurrency": 0}, "max_concurrency=0", error=ConfigurationError),
    row("pack_size-0", {"pack_size": 0}, "pack_size=0", error=ConfigurationError),
    row("pack_size-over-1024", {"pack_size": 5000}, "pack_size=5000", error=ConfigurationError),
    row("generation_kwargs-list", {"generation_kwargs": ["temperature"]}, "generation_kwargs",
        error=ConfigurationError),
    row("generation_kwargs-typo", {"generation_kwargs": {"temprature": 0.5}}, "generation_kwargs",
        "did you mean 'temperature'", error=ConfigurationError),
    row("generation_kwargs-out-of-range", {"generation_kwargs": {"temperature": 5}}, "generation_kwargs",
        "temperature=5", "[0, 2]", error=ConfigurationError),
    row("unknown-field", {"tokeniser": "x"}, "tokeniser", "did you mean 'tokenizer'", error=ConfigurationError),
]


# -- fixtures and checks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tokenizer_dir: Path) -> Iterator[FakeVLLM]:
    with FakeVLLM(tokenizer_dir) as fake:
        yield fake


@pytest.fixture(scope="module")
def clients(server: FakeVLLM, tokenizer_dir: Path) -> Iterator[dict[str, ClientvLLM]]:
    made = {
        "template": ClientvLLM(base_url=server.base_url, tokenizer=str(tokenizer_dir), max_retries=0),
        "chat": ClientvLLM(base_url=server.base_url, tokenizer=None, max_retries=0),
    }
    for llm in made.values():
        llm.load()
    yield made
    for llm in made.values():
        llm.close()


@pytest.fixture(autouse=True)
def _forget_requests(server: FakeVLLM) -> None:
    server.clear()


def sent_prompts(server: FakeVLLM) -> int:
    """How many prompts reached the server, on either path."""
    completions = sum(len(request.body["prompt"]) for request in server.requests_to("/v1/completions"))
    packed = sum(len(request.body["messages"]) for request in server.requests_to("/v1/chat/completions/batch"))
    return completions + packed + len(server.requests_to("/v1/chat/completions"))


def check_message(message: str, *words: str) -> None:
    """The message holds every expected word, is short, and does not read as the server's fault."""
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    for server_words in ("server rejected", "The vLLM server", "HTTP ", "please report"):
        assert server_words not in message, message
    assert len(message) < 1000, message  # never the whole input


def good(index: int) -> list[dict[str, Any]]:
    return user(f"[[q{index}]] tell me something")


# -- one bad input of a batch fails alone --------------------------------------------------------------


@pytest.mark.parametrize(("path", "conversation", "error", "words"), per_path(BAD_CONVERSATIONS))
def test_a_bad_conversation_fails_only_itself(clients, server, path, conversation, error, words):
    outputs = clients[path].generate([good(0), fresh(conversation), good(2)], max_new_tokens=4)

    assert [("error" in output) for output in outputs] == [False, True, False]
    assert outputs[0]["generations"][0].startswith("q0") and outputs[2]["generations"][0].startswith("q2")
    failure = outputs[1]["error"]
    assert (failure.index, failure.type, failure.status_code) == (1, error.__name__, None)
    assert isinstance(failure.exception, error) and outputs[1]["generations"] == [None]
    check_message(failure.message, *words)
    assert sent_prompts(server) == 2  # the bad one was never sent


@pytest.mark.parametrize(("path", "conversation", "error", "words"), per_path(BAD_CONVERSATIONS))
def test_agenerate_raises_the_same_error_for_a_bad_conversation(clients, server, path, conversation, error, words):
    with pytest.raises(error) as info:
        asyncio.run(clients[path].agenerate(fresh(conversation), max_new_tokens=4))
    check_message(str(info.value), *[word.replace("input 1", "input 0") for word in words])
    assert sent_prompts(server) == 0


@pytest.mark.parametrize("path", BOTH)
def test_every_bad_conversation_at_once_fails_only_the_bad_ones(clients, path):
    rows = [r for r in BAD_CONVERSATIONS if path in r.values[3] and not r.marks]
    inputs = []
    for bad in rows:
        inputs += [good(len(inputs)), fresh(bad.values[0])]
    inputs.append(good(len(inputs)))
    with pytest.raises(GenerationFailedError) as info:
        clients[path].generate(inputs, max_new_tokens=4, strict=True)
    assert [failure.index for failure in info.value.failures] == list(range(1, len(inputs), 2))
    outputs = info.value.results
    assert all(outputs[i]["generations"][0].startswith(f"q{i}") for i in range(0, len(inputs), 2))


# -- a bad call fails before anything is sent ------------------------------------------------------------


CALL_ARGUMENTS = {"inputs", "strict", "progress", "checkpoint"}


@pytest.mark.parametrize(("path", "kwargs", "error", "words"), per_path(BAD_CALLS))
def test_a_bad_call_fails_before_anything_is_sent(clients, server, tmp_path, path, kwargs, error, words):
    kwargs = {name: tmp_path if value == DIRECTORY else value for name, value in kwargs.items()}
    inputs = fresh(kwargs.pop("inputs", [good(0), good(1)]))
    with pytest.raises(error) as info:
        clients[path].generate(inputs, **kwargs)
    check_message(str(info.value), *words)
    assert sent_prompts(server) == 0


@pytest.mark.parametrize(
    ("path", "kwargs", "error", "words"),
    [param for param in per_path(BAD_CALLS) if not CALL_ARGUMENTS.intersection(param.values[1])],
)
def test_agenerate_refuses_the_same_parameters(clients, server, path, kwargs, error, words):
    with pytest.raises(error) as info:
        asyncio.run(clients[path].agenerate(good(0), **kwargs))
    check_message(str(info.value), *words)
    assert sent_prompts(server) == 0


@pytest.mark.parametrize("path", BOTH)
def test_inputs_that_raise_midway_end_the_call_with_our_error_naming_the_input(clients, server, path):
    def inputs() -> Iterator[Any]:
        yield good(0)
        yield good(1)
        raise KeyError("text")

    with pytest.raises(InvalidInputError) as info:
        clients[path].generate(inputs(), max_new_tokens=4)
    check_message(str(info.value), "inputs", "raised", "KeyError", "'text'", "input 2")
    assert isinstance(info.value.__cause__, KeyError)
    server.settle()  # requests on their way when the inputs raised land before the next test counts


# -- a bad setting is a ConfigurationError ----------------------------------------------------------------


@pytest.fixture(scope="module")
def no_template_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("no-template") / "tokenizer"
    shutil.copytree(tokenizer_dir, copy)
    (copy / "chat_template.jinja").unlink()
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(("fields", "error", "words"), [pytest.param(*p.values[:3], id=p.id, marks=p.marks)
                                                         for p in BAD_SETTINGS])
def test_a_bad_setting_fails_at_construction_or_load(server, no_template_dir, fields, error, words):
    fields = {"base_url": server.base_url, "tokenizer": None, "max_retries": 0, **fields}
    if fields["tokenizer"] == NO_TEMPLATE:
        fields["tokenizer"] = str(no_template_dir)
    with pytest.raises(error) as info:
        llm = ClientvLLM(**fields)
        try:
            llm.load()
        finally:
            llm.close()
    assert isinstance(info.value, VLLMClientError)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"
    assert sent_prompts(server) == 0


# -- what is not bad input must still go through ------------------------------------------------------


@pytest.mark.parametrize("path", BOTH)
def test_valid_empties_and_edges_are_accepted(clients, server, path):
    outputs = clients[path].generate(
        [good(0), [{"role": "user", "content": ""}], [{"role": "assistant", "content": None}, *good(2)],
         user([])],
        max_new_tokens=4, temperature=0, top_p=1, min_tokens=4, stop=[], stop_token_ids=[], logit_bias={},
        chat_template_kwargs={}, extra_body={}, seed=-(2**63), priority=2**63 - 1, truncate_prompt_tokens=-1,
    )
    assert all("error" not in output for output in outputs), outputs
    assert sent_prompts(server) == 4


class Column:
    """The least an array needs to be taken as a list: ``.tolist()`` (numpy, pandas, pyarrow have it)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def tolist(self) -> list[Any]:
        return list(self.items)


def as_arrays(index: int, *, plain: bool = False) -> list[Any]:
    """Conversation ``index`` in the forms a dataframe library hands a ``list<struct>`` cell over (Ray Data
    and pandas: a numpy array of dicts, content parts an array too; others: any sequence of mappings), or
    (``plain``) each as the list of dicts it stands for."""
    text = f"[[q{index}]] tell me something"
    array, mapping, column = (list, dict, list) if plain else (lambda items: numpy.array(items, dtype=object),
                                                               MappingProxyType, Column)
    return [
        array(user(text)),
        column(user(text)),
        user(text) if plain else tuple(user(text)),
        [mapping({"role": "user", "content": text})],
        array(user(array([mapping({"type": "text", "text": text})]))),
        column([{"role": "system", "content": "be brief"}, *user(column([{"type": "text", "text": text}]))]),
        # Arrow gives every message every field of the column's struct, None where a message had none.
        user(text) if plain else array([{"role": "user", "content": text, "name": None, "tool_call_id": None}]),
    ]


FORMS = len(as_arrays(0))


@pytest.mark.parametrize("path", BOTH)
def test_arrays_and_mappings_are_conversations(clients, server, path, tmp_path):
    inputs = [as_arrays(index)[index] for index in range(FORMS)]
    outputs = clients[path].generate(inputs, max_new_tokens=4, seed=1)

    assert [output.get("error") for output in outputs] == [None] * FORMS
    assert all(outputs[i]["generations"][0].startswith(f"q{i}") for i in range(FORMS))
    single = asyncio.run(clients[path].agenerate(inputs[4], max_new_tokens=4, seed=1))
    assert single["generations"] == outputs[4]["generations"]
    plain = [as_arrays(index, plain=True)[index] for index in range(FORMS)]
    if path == "chat":  # what is sent is plain JSON, as for the lists of dicts
        sent = [json.dumps(conversation) for r in server.requests_to("/v1/chat/completions/batch")
                for conversation in r.body["messages"]]
        assert sorted(sent[:FORMS]) == sorted(json.dumps(conversation) for conversation in plain)
    # A checkpoint takes them for the conversations they stand for.
    clients[path].generate(inputs, max_new_tokens=4, seed=1, checkpoint=tmp_path / "job.jsonl")
    server.clear()
    again = clients[path].generate(plain, max_new_tokens=4, seed=1, checkpoint=tmp_path / "job.jsonl")
    assert sent_prompts(server) == 0
    assert [output["generations"] for output in again] == [output["generations"] for output in outputs]


@pytest.mark.skipif(numpy is None, reason="numpy is optional")
@pytest.mark.parametrize("path", BOTH)
def test_numpy_numbers_are_numbers(clients, server, path):
    outputs = clients[path].generate(
        [good(0)], num_generations=numpy.int64(2), max_new_tokens=numpy.int64(4), seed=numpy.int32(3),
        temperature=numpy.float32(0.5), stop_token_ids=numpy.array([7]), logit_bias={numpy.int64(5): numpy.float64(1)},
    )
    assert outputs[0]["generations"][0].startswith("q0") and len(outputs[0]["generations"]) == 2
    body = (server.requests_to("/v1/completions") or server.requests_to("/v1/chat/completions"))[0].body
    assert (body["n"], body["max_tokens"], body["seed"], body["stop_token_ids"]) == (2, 4, 3, [7])
    assert body["logit_bias"] == {"5": 1.0}
