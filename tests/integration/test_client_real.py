"""ClientvLLM against the real vLLM CPU server (needs scripts/setup-vllm.sh).

Uses the session-wide ``vllm_server`` (the embedded trained tiny model as ``tiny-llama``, context 1024)
and starts one more server of its own, with ``--api-key``, for the authentication tests.
Every count asserted here is checked against the server's own tokenizer (``POST /tokenize``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllmclient import (
    AuthenticationError,
    ChatFormatter,
    ClientvLLM,
    GenerationFailedError,
    LocalServer,
    ModelNotFoundError,
    PromptTooLongError,
)
from vllmclient.tiny_model import DEFAULT_SERVED_NAME

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 1024
QUESTIONS = [
    "Hello, how are you?",
    "Tell me about the cat.",
    "What does Anna like?",
    "Where is the ball?",
    "Write a sentence.",
    "Say hello.",
]
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack"]
THINGS = ["ball", "book", "tree", "river", "garden", "cake", "boat", "kite"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def varied(i: int) -> list[dict[str, str]]:
    """Input ``i`` of a set whose prompts differ in content and length (so their token counts differ)."""
    story = " ".join(f"{NAMES[(i + k) % 10]} sees the {THINGS[(i * k) % 8]}." for k in range(i % 5))
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
    messages.append({"role": "user", "content": f"{story} Tell me about {NAMES[i % 10]} and the {THINGS[i % 8]}.".strip()})
    return messages


def post_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def server_tokenize(server: LocalServer, text: str, *, add_special_tokens: bool) -> list[int]:
    """The server's own tokenization of ``text`` (``POST /tokenize``)."""
    status, body = post_json(
        server.root_url + "/tokenize",
        {"model": server.served_model_name, "prompt": text, "add_special_tokens": add_special_tokens},
    )
    assert status == 200, body
    assert body["count"] == len(body["tokens"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    return body["tokens"]


# ----------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def formatter(vllm_tokenizer_dir: Path) -> ChatFormatter:
    return ChatFormatter.from_pretrained(vllm_tokenizer_dir)


@pytest.fixture(scope="module")
def llm(vllm_server: LocalServer, vllm_tokenizer_dir: Path) -> Iterator[ClientvLLM]:
    """Client-side template (raw prompts to /v1/completions), as distilabel uses it."""
    client = ClientvLLM(base_url=vllm_server.base_url, tokenizer=str(vllm_tokenizer_dir), max_retries=0)
    client.load()
    yield client
    client.close()


@pytest.fixture(scope="module")
def chat_llm(vllm_server: LocalServer) -> Iterator[ClientvLLM]:
    """``tokenizer=None``: the server applies its template (/v1/chat/completions, packs through its /batch)."""
    client = ClientvLLM(base_url=vllm_server.base_url, max_retries=0)
    client.load()
    yield client
    client.close()


# ----------------------------------------------------------------------------------------------------
# the distilabel example and basic behaviour
# ----------------------------------------------------------------------------------------------------


def test_seed_example_verbatim(vllm_server: LocalServer, vllm_tokenizer_dir: Path) -> None:
    # distilabel's documented example with only the import changed (and the URL/tokenizer pointed at the
    # local server and its model folder).
    from vllmclient import ClientvLLM

    llm = ClientvLLM(
        base_url=vllm_server.base_url,
        tokenizer=str(vllm_tokenizer_dir),
    )

    llm.load()

    results = llm.generate_outputs(
        inputs=[[{"role": "user", "content": "Hello, how are you?"}]],
        temperature=0.7,
        top_p=1.0,
        max_new_tokens=256,
    )
    assert isinstance(results, list) and len(results) == 1
    assert isinstance(results[0], list) and len(results[0]) == 1
    assert isinstance(results[0][0], str) and results[0][0].strip()
    assert llm.model_name == DEFAULT_SERVED_NAME and llm.max_model_len == MAX_MODEL_LEN
    llm.close()


def test_num_generations_with_a_seed_repeat_exactly(llm: ClientvLLM) -> None:
    inputs = [user(q) for q in QUESTIONS[:3]]
    first = llm.generate(inputs, num_generations=2, temperature=1.0, seed=7, max_new_tokens=32)
    again = llm.generate(inputs, num_generations=2, temperature=1.0, seed=7, max_new_tokens=32)
    for output in first:
        assert "error" not in output
        assert len(output["generations"]) == 2 and all(isinstance(t, str) and t for t in output["generations"])
        assert len(output["statistics"]["input_tokens"]) == len(output["statistics"]["output_tokens"]) == 2
        assert len(output["finish_reasons"]) == 2
    assert [o["generations"] for o in again] == [o["generations"] for o in first]
    assert [o["statistics"] for o in again] == [o["statistics"] for o in first]


def test_stop_strings_cut_the_text(llm: ClientvLLM) -> None:
    inputs = [user(q) for q in QUESTIONS]
    free = llm.generate(inputs, temperature=0, max_new_tokens=64)
    stopped = llm.generate(inputs, temperature=0, max_new_tokens=64, stop=["."])
    cut = 0
    for before, after in zip(free, stopped, strict=True):
        text = after["generations"][0]
        assert isinstance(text, str) and "." not in text
        assert after["finish_reasons"] == ["stop"]
        # Greedy: the stopped text is the free text up to its first "." (excluded, as vLLM does by default).
        assert text == before["generations"][0].split(".")[0]
        cut += "." in before["generations"][0]
    assert cut >= len(inputs) // 2  # most answers are sentences, so the stop string really was hit

    kept = llm.generate(inputs[:2], temperature=0, max_new_tokens=64, stop=["."], include_stop_str_in_output=True)
    for before, after in zip(free, kept, strict=False):
        if "." in before["generations"][0]:
            assert after["generations"][0] == before["generations"][0].split(".")[0] + "."


def test_max_new_tokens_is_respected_with_finish_reason_length(llm: ClientvLLM, vllm_server: LocalServer) -> None:
    inputs = [user(q) for q in QUESTIONS]
    outputs = llm.generate(inputs, num_generations=2, max_new_tokens=5, ignore_eos=True, seed=3)
    for output in outputs:
        assert output["finish_reasons"] == ["length", "length"]
        assert output["statistics"]["output_tokens"] == [5, 5]
        assert all(isinstance(text, str) for text in output["generations"])
    # Past EOS the model opens the next turn with special tokens, which the text skips by default; shown,
    # they re-tokenize to exactly max_new_tokens tokens.
    greedy = llm.generate(inputs, max_new_tokens=5, ignore_eos=True, temperature=0, skip_special_tokens=False)
    for output in greedy:
        assert output["finish_reasons"] == ["length"] and output["statistics"]["output_tokens"] == [5]
        assert len(server_tokenize(vllm_server, output["generations"][0], add_special_tokens=False)) == 5


def test_a_trained_model_ends_turns_naturally(llm: ClientvLLM, vllm_server: LocalServer) -> None:
    outputs = llm.generate([user(q) for q in QUESTIONS], temperature=0, max_new_tokens=64)
    stopped = [o for o in outputs if o["finish_reasons"] == ["stop"]]
    assert len(stopped) >= len(outputs) - 1, outputs
    for output in stopped:
        text, count = output["generations"][0], output["statistics"]["output_tokens"][0]
        assert text.strip() and "<|eot_id|>" not in text
        assert count is not None and count < 64
        # vLLM counts the EOS token (<|eot_id|>) among the output tokens, but leaves it out of the text.
        assert count == len(server_tokenize(vllm_server, text, add_special_tokens=False)) + 1


def test_chat_path_gives_the_same_shapes_and_texts(llm: ClientvLLM, chat_llm: ClientvLLM) -> None:
    inputs = [user(q) for q in QUESTIONS[:4]] + [varied(3)]
    chat = chat_llm.generate(inputs, num_generations=2, temperature=1.0, seed=5, max_new_tokens=24)
    for output in chat:
        assert set(output) == {"generations", "statistics", "finish_reasons", "request_id", "latency"}
        assert len(output["generations"]) == 2 and all(isinstance(t, str) and t for t in output["generations"])
        assert all(isinstance(c, int) and c > 0 for c in output["statistics"]["input_tokens"])
        assert all(isinstance(c, int) and 0 < c <= 24 for c in output["statistics"]["output_tokens"])
        assert all(r in ("stop", "length") for r in output["finish_reasons"])
    # The server renders the same template without adding a second BOS, so greedy answers and counts
    # match the client-side path exactly.
    greedy_chat = chat_llm.generate(inputs, temperature=0, max_new_tokens=48)
    greedy_raw = llm.generate(inputs, temperature=0, max_new_tokens=48)
    assert [o["generations"] for o in greedy_chat] == [o["generations"] for o in greedy_raw]
    assert [o["statistics"]["output_tokens"] for o in greedy_chat] == [o["statistics"]["output_tokens"] for o in greedy_raw]
    assert [o["finish_reasons"] for o in greedy_chat] == [o["finish_reasons"] for o in greedy_raw]
    # Packed conversations (/v1/chat/completions/batch) have no input count of their own; one per request, the
    # server's count is the client-side template's.
    with ClientvLLM(base_url=chat_llm.base_url, tokenizer=None, pack_size=1, max_retries=0) as single:
        alone = single.generate(inputs, temperature=0, max_new_tokens=48)
    assert [o["statistics"] for o in alone] == [o["statistics"] for o in greedy_raw]


@pytest.mark.asyncio
async def test_chat_path_agenerate(chat_llm: ClientvLLM) -> None:
    output = await chat_llm.agenerate(user("Say hello."), num_generations=3, max_new_tokens=16, seed=1)
    assert len(output["generations"]) == 3 and all(output["generations"])
    assert all(c is not None for c in output["statistics"]["output_tokens"])


# ----------------------------------------------------------------------------------------------------
# statistics and BOS, against the server's own tokenizer
# ----------------------------------------------------------------------------------------------------


def test_statistics_match_the_servers_counts(
    llm: ClientvLLM, vllm_server: LocalServer, formatter: ChatFormatter
) -> None:
    """input_tokens: the server's count of the rendered prompt; output_tokens: the tokens it generated.

    vLLM counts the EOS token (<|eot_id|>) among the generated tokens but leaves it out of the text, so a
    turn that ends naturally has one token more than its text. Re-tokenizing the text gives the same ids
    only when the model picked the tokenizer's own split: it sometimes writes a number digit by digit
    ("8", "2") where the tokenizer has "82", so that comparison is made only where the ids agree.
    """
    eos_ids = {formatter.tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")}
    inputs = [user(q) for q in QUESTIONS] + [varied(i) for i in range(6)]
    outputs = llm.generate(inputs, temperature=0, max_new_tokens=40)
    canonical = 0
    for conversation, output in zip(inputs, outputs, strict=True):
        prompt = formatter.render(conversation)
        assert output["statistics"]["input_tokens"] == [
            len(server_tokenize(vllm_server, prompt, add_special_tokens=False))
        ]
        text, count = output["generations"][0], output["statistics"]["output_tokens"][0]
        # The same request sent alone: the server's usage and generated ids agree with the statistics.
        status, body = post_json(vllm_server.base_url + "/completions", {
            "model": vllm_server.served_model_name, "prompt": prompt, "add_special_tokens": False,
            "temperature": 0, "max_tokens": 40, "return_token_ids": True,
        })
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["text"] == text and [choice["finish_reason"]] == output["finish_reasons"]
        assert body["usage"]["prompt_tokens"] == output["statistics"]["input_tokens"][0]
        assert body["usage"]["completion_tokens"] == count == len(choice["token_ids"])
        ids = choice["token_ids"]
        if output["finish_reasons"] == ["stop"]:
            assert ids[-1] in eos_ids  # the EOS is counted ...
            ids = ids[:-1]  # ... but not shown
        else:
            assert count == 40
        status, body = post_json(
            vllm_server.root_url + "/detokenize", {"model": vllm_server.served_model_name, "tokens": ids}
        )
        assert status == 200 and body["prompt"] == text
        retokenized = server_tokenize(vllm_server, text, add_special_tokens=False)
        if retokenized == ids:
            canonical += 1
            assert count == len(retokenized) + (output["finish_reasons"] == ["stop"])
    assert canonical >= len(inputs) // 2


def test_no_double_bos(llm: ClientvLLM, vllm_server: LocalServer, formatter: ChatFormatter) -> None:
    conversation = user("Hello, how are you?")
    prompt = formatter.render(conversation)
    bos = formatter.tokenizer.bos_token
    bos_id = formatter.tokenizer.bos_token_id
    assert prompt.startswith(bos) and prompt.count(bos) == 1  # the template writes BOS itself
    single = server_tokenize(vllm_server, prompt, add_special_tokens=False)
    double = server_tokenize(vllm_server, prompt, add_special_tokens=True)  # what distilabel sends
    assert single.count(bos_id) == 1 and single[0] == bos_id
    assert double.count(bos_id) == 2 and double[:2] == [bos_id, bos_id]
    assert double[1:] == single
    output = llm.generate([conversation], max_new_tokens=8)[0]
    assert output["statistics"]["input_tokens"] == [len(single)]


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------

LONG = "Anna sees the ball in the park every morning. " * 200  # ~2000 tokens


def test_too_long_prompt_fails_alone_checked_locally(llm: ClientvLLM, formatter: ChatFormatter) -> None:
    inputs = [user("Say hello."), user(LONG), user("Where is the ball?")]
    outputs = llm.generate(inputs, max_new_tokens=8, temperature=0)
    ok = [outputs[0], outputs[2]]
    assert all("error" not in o and o["generations"][0] for o in ok)
    error = outputs[1]["error"]
    assert outputs[1]["generations"] == [None]
    count = formatter.count_tokens(formatter.render(inputs[1]))
    assert count > MAX_MODEL_LEN
    assert error.index == 1 and error.type == "PromptTooLongError"
    assert str(count) in error.message and str(MAX_MODEL_LEN) in error.message
    assert error.status_code is None  # never sent
    assert isinstance(error.exception, PromptTooLongError)
    assert error.exception.prompt_tokens == count and error.exception.max_model_len == MAX_MODEL_LEN

    with pytest.raises(GenerationFailedError, match="1 of 3 inputs failed") as info:
        llm.generate(inputs, max_new_tokens=8, strict=True)
    assert [f.index for f in info.value.failures] == [1]
    assert "PromptTooLongError" in str(info.value) and str(MAX_MODEL_LEN) in str(info.value)


def test_too_long_prompt_rejected_by_the_server_is_split_out_of_its_pack(
    vllm_server: LocalServer, vllm_tokenizer_dir: Path
) -> None:
    client = ClientvLLM(
        base_url=vllm_server.base_url, tokenizer=str(vllm_tokenizer_dir), pack_size=16, max_retries=0
    )
    client.load()
    _forget_max_model_len(client)  # the client now believes anything fits: the server must say no
    try:
        inputs = [user(q) for q in QUESTIONS[:3]] + [user(LONG)] + [user(q) for q in QUESTIONS[3:]]
        outputs = client.generate(inputs, max_new_tokens=8, temperature=0)
    finally:
        client.close()
    for index, output in enumerate(outputs):
        if index == 3:
            continue
        assert "error" not in output, output
        assert output["generations"][0] and output["finish_reasons"][0] in ("stop", "length")
    failed = outputs[3]
    assert failed["generations"] == [None] and failed["finish_reasons"] == [None]
    error = failed["error"]
    assert error.index == 3 and error.type == "PromptTooLongError"
    assert error.status_code == 400
    assert "maximum context length is 1024" in error.message
    assert isinstance(error.exception, PromptTooLongError)
    assert error.exception.max_model_len == MAX_MODEL_LEN
    assert error.exception.prompt_tokens is not None and error.exception.prompt_tokens > MAX_MODEL_LEN


def test_too_long_prompt_on_the_chat_path_fails_alone(chat_llm: ClientvLLM) -> None:
    outputs = chat_llm.generate([user("Say hello."), user(LONG)], max_new_tokens=8)
    assert "error" not in outputs[0] and outputs[0]["generations"][0]
    error = outputs[1]["error"]
    assert error.type == "PromptTooLongError" and error.status_code == 400
    assert "maximum context length is 1024" in error.message


def test_unknown_model_lists_the_served_ones(vllm_server: LocalServer) -> None:
    client = ClientvLLM(base_url=vllm_server.base_url, model="nope", max_retries=0)
    with pytest.raises(ModelNotFoundError, match="tiny-llama") as info:
        client.load()
    assert info.value.served_models == [DEFAULT_SERVED_NAME]
    assert "nope" in str(info.value)
    client.close()


@pytest.mark.asyncio
async def test_unknown_model_at_the_server_is_translated(vllm_server: LocalServer) -> None:
    """The server's own 404 (a model that disappears after load) becomes ModelNotFoundError too."""
    client = ClientvLLM(base_url=vllm_server.base_url, max_retries=0)
    await client.aload()
    client._model_name = "nope"
    try:
        with pytest.raises(ModelNotFoundError, match="tiny-llama") as info:
            await client.agenerate(user("Say hello."), max_new_tokens=4)
        assert info.value.status_code == 404
        outputs = client.generate([user("Say hello.")], max_new_tokens=4)
        assert outputs[0]["error"].type == "ModelNotFoundError" and outputs[0]["error"].status_code == 404
    finally:
        await client.aclose()


# ----------------------------------------------------------------------------------------------------
# a server with --api-key
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(vllm_server_python: str) -> Iterator[LocalServer]:
    with LocalServer(python=vllm_server_python, api_key="sekret") as server:
        yield server


def test_missing_or_wrong_api_key_is_an_authentication_error(
    auth_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    status, _ = post_json(auth_server.base_url + "/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 401
    for key in (None, "wrong"):
        client = ClientvLLM(base_url=auth_server.base_url, api_key=key, max_retries=0)
        with pytest.raises(AuthenticationError, match="api_key") as info:
            client.load()
        assert info.value.status_code == 401
        client.close()


def test_api_key_argument(auth_server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with ClientvLLM(base_url=auth_server.base_url, api_key="sekret", max_retries=0) as client:
        outputs = client.generate_outputs([user("Say hello.")], max_new_tokens=8)
    assert outputs[0][0]


def test_api_key_from_the_environment(
    auth_server: LocalServer, vllm_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sekret")
    with ClientvLLM(base_url=auth_server.base_url, tokenizer=str(vllm_tokenizer_dir), max_retries=0) as client:
        outputs = client.generate_outputs([user("Say hello."), user("Where is the ball?")], max_new_tokens=8)
    assert all(texts[0] for texts in outputs)


# ----------------------------------------------------------------------------------------------------
# packing and streaming
# ----------------------------------------------------------------------------------------------------


def test_packed_and_unpacked_give_identical_results(
    vllm_server: LocalServer, vllm_tokenizer_dir: Path, formatter: ChatFormatter
) -> None:
    inputs = [varied(i) for i in range(40)]
    results = {}
    for pack_size in (1, 16, None):
        with ClientvLLM(
            base_url=vllm_server.base_url, tokenizer=str(vllm_tokenizer_dir), pack_size=pack_size, max_retries=0
        ) as client:
            results[pack_size] = client.generate(inputs, temperature=1.0, seed=1234, max_new_tokens=32)
    for outputs in results.values():
        assert len({o.pop("request_id") for o in outputs}) >= 2  # each pack its own request id
        assert all(o.pop("latency") > 0 for o in outputs)  # each request's own time
    unpacked = results[1]
    assert all("error" not in o for o in unpacked)
    assert results[16] == unpacked
    assert results[None] == unpacked
    # Each result belongs to its own input: the prompts' token counts differ and are matched one by one.
    expected = [formatter.count_tokens(formatter.render(conversation)) for conversation in inputs]
    assert [o["statistics"]["input_tokens"][0] for o in unpacked] == expected
    assert len(set(expected)) >= 5
    assert len({o["generations"][0] for o in unpacked}) >= 3  # not one text repeated 40 times


@pytest.mark.asyncio
async def test_aiter_generate_yields_every_index_once(llm: ClientvLLM) -> None:
    inputs = [varied(i) for i in range(30)] + [user(LONG)]
    seen: list[int] = []
    async for index, output in llm.aiter_generate(iter(inputs), max_new_tokens=8, temperature=0):
        seen.append(index)
        if index == 30:
            assert output["error"].type == "PromptTooLongError"
        else:
            assert "error" not in output and output["generations"][0]
    assert sorted(seen) == list(range(31))


def _forget_max_model_len(client: ClientvLLM) -> None:
    """Make the client unable to check lengths locally, so that the server is the judge."""
    from vllmclient._server import ModelCard

    assert client._server is not None
    client._server.cards[:] = [ModelCard(card.id, card.parent, None) for card in client._server.cards]


# ----------------------------------------------------------------------------------------------------
# the request surface (issue 8): length edges, truncation, content parts, prompt logprobs, tokenizer check
# ----------------------------------------------------------------------------------------------------


def _exact(formatter: ChatFormatter, tokens: int) -> list[dict[str, str]]:
    """A conversation whose rendered prompt has exactly ``tokens`` tokens."""
    words: list[str] = []
    while formatter.count_tokens(formatter.render(user(" ".join(["Anna", *words])))) < tokens:
        words.append("Anna")
    conversation = user(" ".join(["Anna", *words]))
    assert formatter.count_tokens(formatter.render(conversation)) == tokens
    return conversation


@pytest.mark.parametrize("checked_locally", [True, False])
def test_a_prompt_of_exactly_max_model_len_in_a_pack_fails_alone(
    vllm_server: LocalServer, vllm_tokenizer_dir: Path, formatter: ChatFormatter, checked_locally: bool
) -> None:
    client = ClientvLLM(base_url=vllm_server.base_url, tokenizer=str(vllm_tokenizer_dir), pack_size=8, max_retries=0)
    client.load()
    if not checked_locally:
        _forget_max_model_len(client)
    try:
        inputs = [user(q) for q in QUESTIONS[:3]] + [_exact(formatter, MAX_MODEL_LEN)] + [user(q) for q in QUESTIONS[3:]]
        outputs = client.generate(inputs, max_new_tokens=8, temperature=0)
    finally:
        client.close()
    assert [("error" in output) for output in outputs] == [False, False, False, True, False, False, False]
    error = outputs[3]["error"]
    assert error.type == "PromptTooLongError"
    assert error.status_code == (None if checked_locally else 400)


def test_truncate_prompt_tokens_lets_a_long_prompt_through(llm: ClientvLLM, chat_llm: ClientvLLM) -> None:
    for client in (llm, chat_llm):
        output = client.generate([user(LONG)], truncate_prompt_tokens=50, truncation_side="left", max_new_tokens=4)[0]
        assert "error" not in output, output.get("error")
        assert output["statistics"]["input_tokens"] == [50]


def test_a_very_long_chat_prompt_is_prompt_too_long(chat_llm: ClientvLLM) -> None:
    """Past vLLM's character bound the server refuses by characters, not tokens: still PromptTooLongError."""
    output = chat_llm.generate([user("x" * 200_000)], max_new_tokens=4)[0]
    assert output["error"].type == "PromptTooLongError", output["error"]
    assert "characters" in output["error"].message


def test_text_parts_give_the_same_text_as_a_string(llm: ClientvLLM, chat_llm: ClientvLLM) -> None:
    parts = [{"type": "text", "text": "Tell me about Anna."}, {"type": "text", "text": "And the ball."}]
    joined = "Tell me about Anna.\nAnd the ball."
    for client in (llm, chat_llm):
        outputs = client.generate([user(parts), user(joined)], max_new_tokens=12, temperature=0)  # type: ignore[arg-type]
        assert outputs[0]["generations"] == outputs[1]["generations"]
        assert outputs[0]["statistics"]["input_tokens"] == outputs[1]["statistics"]["input_tokens"]


def test_prompt_logprobs_have_one_entry_per_prompt_token(llm: ClientvLLM, chat_llm: ClientvLLM) -> None:
    for client in (llm, chat_llm):
        output = client.generate([user("Say hello.")], prompt_logprobs=2, max_new_tokens=4)[0]
        positions = output["prompt_logprobs"]
        assert len(positions) == output["statistics"]["input_tokens"][0]
        assert positions[0] is None and all(1 <= len(top) <= 3 for top in positions[1:])
        assert all(entry["rank"] >= 1 for top in positions[1:] for entry in top)
    formatter = llm._formatter
    ids = formatter.tokenizer(formatter.render(user("Say hello.")), add_special_tokens=False)["input_ids"]
    own = [top[0]["token"] for top in llm.generate([user("Say hello.")], prompt_logprobs=2)[0]["prompt_logprobs"][1:]]
    assert own == [formatter.tokenizer.decode([token]) for token in ids[1:]]  # the prompt's own token first


def test_removed_guided_fields_are_refused_by_version(llm: ClientvLLM) -> None:
    from vllmclient import InvalidInputError

    with pytest.raises(InvalidInputError, match="guided_choice.*removed.*0\\.32"):
        llm.generate([user("x")], extra_body={"guided_choice": ["yes", "no"]})


def test_the_tokenizer_check_against_the_real_server(
    vllm_server: LocalServer, vllm_tokenizer_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    with ClientvLLM(base_url=vllm_server.base_url, tokenizer=str(vllm_tokenizer_dir)):
        pass
    assert not [r for r in caplog.records if "does not match" in r.getMessage()]
    other = tmp_path / "other"
    shutil.copytree(vllm_tokenizer_dir, other, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    with ClientvLLM(base_url=vllm_server.base_url, tokenizer=str(other)):
        pass
    assert [r for r in caplog.records if "does not match the served model 'tiny-llama'" in r.getMessage()]
