"""Token-id prompts (issue 10, item 1) and ``send_token_ids`` (rendering and tokenizing on the client).

An input may be a list of token ids: it is sent as it is in ``/v1/completions``'s ``prompt``, packed like
text prompts, and checked on the client (ints, in the tokenizer's vocabulary, not empty, room for one output
token). ``send_token_ids=True`` renders each conversation, tokenizes it on the client and sends the ids; the
results must be those of the text path. Every claim is checked on what the fake server received.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from vllmclient import ChatFormatter, ClientvLLM, InvalidInputError, PromptTooLongError


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


CONVERSATIONS = [
    user("Tell me about the cat."),
    [{"role": "system", "content": "Be brief."}, user("Where is the red ball?")[0]],
    user("Say hello to Anna and Ben."),
    user("A longer question about the river, the bridge, the old farmer and his happy child?"),
    user("[[q4]] tell me something"),
]


@pytest.fixture(scope="module")
def formatter(tokenizer_dir: Any) -> ChatFormatter:
    return ChatFormatter.from_pretrained(tokenizer_dir)


def ids_of(formatter: ChatFormatter, conversation: list[dict[str, str]]) -> list[int]:
    """What the server's tokenizer makes of the rendered prompt with add_special_tokens=False (one BOS)."""
    ids: list[int] = formatter.tokenizer.encode(formatter.render(conversation), add_special_tokens=False)
    return ids


def client(server: Any, tokenizer: Any, **kwargs: Any) -> ClientvLLM:
    return ClientvLLM(base_url=server.base_url, tokenizer=tokenizer, max_retries=0, **kwargs)


def sent(server: Any) -> list[Any]:
    """The ``prompt`` field of every /v1/completions request, in arrival order."""
    return [request.body["prompt"] for request in server.requests_to("/v1/completions")]


def comparable(output: dict[str, Any]) -> dict[str, Any]:
    """An output without what differs from request to request (its id, its latency)."""
    return {key: value for key, value in output.items() if key not in ("request_id", "latency")}


# -- 1. token-id inputs ---------------------------------------------------------------------------------------


def test_token_id_inputs_are_packed_sent_as_they_are_and_answer_as_their_text(fake_vllm, tokenizer_dir, formatter):
    ids = [ids_of(formatter, conversation) for conversation in CONVERSATIONS]
    assert all(row.count(formatter.tokenizer.bos_token_id) == 1 for row in ids)
    params = {"max_new_tokens": 12, "seed": 3, "logprobs": 2, "prompt_logprobs": 1}
    with client(fake_vllm, tokenizer_dir, pack_size=8) as llm:
        from_ids = llm.generate(ids, **params)
        fake_vllm.clear()
        from_text = llm.generate(CONVERSATIONS, **params)
    assert [comparable(output) for output in from_ids] == [comparable(output) for output in from_text]
    assert [output["statistics"]["input_tokens"] for output in from_ids] == [[len(row)] for row in ids]
    assert from_ids[4]["generations"][0].split()[0] == "q4"  # the fake's tag: the prompt's own text was read


def test_token_id_inputs_go_in_one_pack_as_a_list_of_lists(fake_vllm, tokenizer_dir, formatter):
    ids = [ids_of(formatter, conversation) for conversation in CONVERSATIONS]
    with client(fake_vllm, tokenizer_dir, pack_size=8) as llm:
        llm.generate(ids, max_new_tokens=4)
    assert sent(fake_vllm) == [ids]


def test_mixed_text_and_token_id_inputs_are_sent_in_packs_of_one_kind(fake_vllm, tokenizer_dir, formatter):
    """vLLM's ``prompt`` is a list of str or a list of id lists, never both (a mixed list is a 400 for all)."""
    inputs: list[Any] = [CONVERSATIONS[i] if i % 2 else ids_of(formatter, CONVERSATIONS[i]) for i in range(5)]
    with client(fake_vllm, tokenizer_dir, pack_size=8) as llm:
        outputs = llm.generate(inputs, max_new_tokens=6, seed=1)
        fake_vllm.clear()
        expected = llm.generate(CONVERSATIONS, max_new_tokens=6, seed=1)
    assert all("error" not in output for output in outputs)
    assert [comparable(output) for output in outputs] == [comparable(output) for output in expected]


def test_mixed_packs_hold_one_kind_each(fake_vllm, tokenizer_dir, formatter):
    inputs: list[Any] = [CONVERSATIONS[i] if i % 2 else ids_of(formatter, CONVERSATIONS[i]) for i in range(5)]
    with client(fake_vllm, tokenizer_dir, pack_size=8) as llm:
        outputs = llm.generate(inputs, max_new_tokens=6)
    assert all("error" not in output for output in outputs)
    packs = sent(fake_vllm)
    assert sorted(len(pack) for pack in packs) == [2, 3]
    assert all(len({type(prompt) for prompt in pack}) == 1 for pack in packs)


def test_agenerate_and_numpy_arrays_take_token_ids(fake_vllm, tokenizer_dir, formatter):
    ids = ids_of(formatter, CONVERSATIONS[0])
    with client(fake_vllm, tokenizer_dir) as llm:
        one = asyncio.run(llm.agenerate(ids, max_new_tokens=5, seed=2))
        array = llm.generate([np.array(ids, dtype=np.int64), tuple(ids)], max_new_tokens=5, seed=2)
        text = asyncio.run(llm.agenerate(CONVERSATIONS[0], max_new_tokens=5, seed=2))
    assert one["generations"] == text["generations"] == array[0]["generations"] == array[1]["generations"]
    assert [prompt for pack in sent(fake_vllm)[:-1] for prompt in pack] == [ids, ids, ids]  # plain ints in JSON


BAD_IDS: list[tuple[Any, type[Exception], list[str]]] = [
    ([1, 2, -1, 4], InvalidInputError, ["input 1", "position 2", "-1", "vocabulary"]),
    ([1, 2, 99999], InvalidInputError, ["input 1", "position 2", "99999", "vocabulary", "TOP"]),
    ([1, "two", 3], InvalidInputError, ["input 1", "position 1", "'two'", "int"]),
    ([1, True, 3], InvalidInputError, ["input 1", "position 1", "True", "int"]),
    ([1, 2.0, 3], InvalidInputError, ["input 1", "position 1", "2.0", "int"]),
    ([5] * 1024, PromptTooLongError, ["input 1", "1024 tokens", "1024", "room"]),
]


@pytest.mark.parametrize(("bad", "error", "words"), BAD_IDS)
def test_a_bad_token_id_input_fails_alone_before_it_is_sent(fake_vllm, tokenizer_dir, formatter, bad, error, words):
    good = [ids_of(formatter, conversation) for conversation in CONVERSATIONS[:3]]
    words = [word.replace("TOP", f"0 to {len(formatter.tokenizer) - 1}") for word in words]
    with client(fake_vllm, tokenizer_dir, pack_size=8) as llm:
        outputs = llm.generate([good[0], bad, good[1], good[2]], max_new_tokens=4)
        with pytest.raises(error) as raised:
            asyncio.run(llm.agenerate(bad, max_new_tokens=4))
    failure = outputs[1]["error"]
    assert failure.type == error.__name__ and failure.status_code is None
    assert all(word in failure.message for word in words), failure.message
    assert all(word.replace("input 1", "input 0") in str(raised.value) for word in words)
    assert [i for i, output in enumerate(outputs) if "error" in output] == [1]
    assert sent(fake_vllm) == [[good[0], good[1], good[2]]]  # the bad one never reached the server


def test_token_ids_kept_by_truncate_prompt_tokens_may_be_longer_than_the_context(fake_vllm, tokenizer_dir):
    with client(fake_vllm, tokenizer_dir) as llm:
        output = llm.generate([[5] * 1500], max_new_tokens=4, truncate_prompt_tokens=100)[0]
    assert "error" not in output
    assert output["statistics"]["input_tokens"] == [100]


def test_the_chat_path_refuses_token_ids_with_the_fix(fake_vllm, formatter):
    with client(fake_vllm, None) as llm:
        outputs = llm.generate([CONVERSATIONS[0], ids_of(formatter, CONVERSATIONS[0])], max_new_tokens=4)
    message = outputs[1]["error"].message
    assert "error" not in outputs[0]
    assert "input 1" in message and "token ids" in message and "tokenizer=" in message
    assert not fake_vllm.requests_to("/v1/completions")


# -- 2. send_token_ids: render and tokenize on the client -------------------------------------------------------


def test_send_token_ids_sends_the_ids_the_server_would_make_with_one_bos(fake_vllm, tokenizer_dir, formatter):
    with client(fake_vllm, tokenizer_dir, pack_size=8, send_token_ids=True) as llm:
        outputs = llm.generate(CONVERSATIONS, max_new_tokens=4)
    assert sent(fake_vllm) == [[ids_of(formatter, conversation) for conversation in CONVERSATIONS]]
    assert [output["statistics"]["input_tokens"][0] for output in outputs] == [
        len(ids_of(formatter, conversation)) for conversation in CONVERSATIONS]


@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": 16, "seed": 5},
        {"max_new_tokens": 8, "temperature": 0.0, "logprobs": 3, "prompt_logprobs": 2},
        {"max_new_tokens": 24, "seed": 1, "stop": ["e"], "num_generations": 3},
        {"max_new_tokens": 6, "seed": 2, "truncate_prompt_tokens": 5, "truncation_side": "left"},
    ],
)
def test_send_token_ids_gives_the_results_of_the_text_path(fake_vllm, tokenizer_dir, params):
    with client(fake_vllm, tokenizer_dir, pack_size=3) as text, \
            client(fake_vllm, tokenizer_dir, pack_size=3, send_token_ids=True) as ids:
        expected = text.generate(CONVERSATIONS, **params)
        got = ids.generate(CONVERSATIONS, **params)
        one = asyncio.run(ids.agenerate(CONVERSATIONS[1], **params))
    assert [comparable(output) for output in got] == [comparable(output) for output in expected]
    assert comparable(one) == comparable(expected[1])


def test_send_token_ids_with_magpie_sends_the_rendered_pre_query(fake_vllm, tokenizer_dir, formatter):
    magpie = ChatFormatter.from_pretrained(tokenizer_dir, magpie_pre_query_template="llama3")
    inputs = [[], [{"role": "system", "content": "You are kind."}]]
    with client(fake_vllm, tokenizer_dir, send_token_ids=True, use_magpie_template=True,
                magpie_pre_query_template="llama3", pack_size=8) as llm:
        outputs = llm.generate(inputs, max_new_tokens=4)
    expected = [magpie.tokenizer.encode(magpie.render(conversation), add_special_tokens=False) for conversation in inputs]
    assert all("error" not in output for output in outputs)
    assert sent(fake_vllm) == [expected]
    assert all(row.count(magpie.tokenizer.bos_token_id) == 1 for row in expected)


def test_send_token_ids_checks_the_length_with_its_own_count(fake_vllm, tokenizer_dir, formatter):
    words = " ".join(["Anna sees the ball."] * 400)
    with client(fake_vllm, tokenizer_dir, pack_size=8, send_token_ids=True) as llm:
        outputs = llm.generate([CONVERSATIONS[0], user(words), CONVERSATIONS[1]], max_new_tokens=4)
    count = len(ids_of(formatter, user(words)))
    assert count >= 1024
    assert isinstance(outputs[1]["error"].exception, PromptTooLongError)
    assert f"{count} tokens" in outputs[1]["error"].message
    assert "error" not in outputs[0] and "error" not in outputs[2]
    assert sent(fake_vllm) == [[ids_of(formatter, CONVERSATIONS[0]), ids_of(formatter, CONVERSATIONS[1])]]


def test_send_token_ids_streams_the_same_text(fake_vllm, tokenizer_dir):
    with client(fake_vllm, tokenizer_dir) as text, client(fake_vllm, tokenizer_dir, send_token_ids=True) as ids:
        expected = "".join(getattr(event, "text", "") for event in text.stream(CONVERSATIONS[0], max_new_tokens=8, seed=4))
        fake_vllm.clear()
        got = "".join(getattr(event, "text", "") for event in ids.stream(CONVERSATIONS[0], max_new_tokens=8, seed=4))
    assert got == expected and got
    assert isinstance(sent(fake_vllm)[0][0], list)


def test_a_prompt_the_server_refuses_in_a_pack_of_ids_fails_alone(fake_vllm, tokenizer_dir):
    fake_vllm.fail_prompts_containing("POISON")  # matched on what the ids decode to, as vLLM would read them
    inputs = [*CONVERSATIONS[:3], user("POISON here"), *CONVERSATIONS[3:]]
    with client(fake_vllm, tokenizer_dir, pack_size=8, send_token_ids=True) as llm:
        outputs = llm.generate(inputs, max_new_tokens=4)
    assert [i for i, output in enumerate(outputs) if "error" in output] == [3]
    assert outputs[3]["error"].status_code == 400
    sent_texts = [request.texts for request in fake_vllm.requests_to("/v1/completions")]
    assert len(sent_texts[0]) == 6 and "POISON" in sent_texts[0][3]
    assert [sent_texts[0][3]] in sent_texts[1:]  # split down to the guilty prompt alone
    assert all(isinstance(prompt, list) for pack in sent(fake_vllm) for prompt in pack)


def test_token_id_inputs_resume_from_a_checkpoint(fake_vllm, tokenizer_dir, formatter, tmp_path):
    ids = [ids_of(formatter, conversation) for conversation in CONVERSATIONS]
    job = tmp_path / "job.jsonl"
    with client(fake_vllm, tokenizer_dir, pack_size=8) as llm:
        first = llm.generate(ids[:3], max_new_tokens=5, seed=1, checkpoint=job)
        fake_vllm.clear()
        again = llm.generate([np.array(row) for row in ids], max_new_tokens=5, seed=1, checkpoint=job)
    assert [comparable(output) for output in again[:3]] == [comparable(output) for output in first]
    assert sent(fake_vllm) == [ids[3:]]  # only what was missing


def test_a_token_id_input_streams(fake_vllm, tokenizer_dir, formatter):
    with client(fake_vllm, tokenizer_dir) as llm:
        expected = "".join(getattr(event, "text", "") for event in llm.stream(CONVERSATIONS[2], max_new_tokens=8, seed=4))
        got = "".join(getattr(event, "text", "") for event in llm.stream(ids_of(formatter, CONVERSATIONS[2]),
                                                                          max_new_tokens=8, seed=4))
    assert got == expected and got


@pytest.mark.parametrize(
    ("bad", "word"),
    [([True, 1, 2], "True"), ([1.0, 2, 3], "1.0"), (np.array([1.5, 2.0]), "1.5"), (np.array([True, False]), "True")],
)
def test_a_token_id_prompt_whose_first_id_is_no_int_gets_the_token_id_error(fake_vllm, tokenizer_dir, bad, word):
    """A list led by a bool or a float is no conversation either: its error is the token-id one (position 0, the
    item, "int"), as for a bad id further in, not "message 0: expected a dict"."""
    with client(fake_vllm, tokenizer_dir) as llm:
        failure = llm.generate([bad], max_new_tokens=4)[0]["error"]
    assert failure.type == "InvalidInputError" and failure.status_code is None
    for expected in ("input 0", "position 0", word, "not an int token id"):
        assert expected in failure.message, failure.message
    assert sent(fake_vllm) == []


@pytest.mark.parametrize("magpie", [False, True])
def test_an_empty_array_of_token_ids_is_an_empty_token_id_prompt_not_an_empty_conversation(
    fake_vllm, tokenizer_dir, magpie
):
    """An empty int (or float) array is a token-id prompt with no ids: refused as such (Magpie on, it was
    taken for an empty conversation and generated from; off, the error pointed at Magpie)."""
    extra = {"use_magpie_template": True, "magpie_pre_query_template": "llama3"} if magpie else {}
    with client(fake_vllm, tokenizer_dir, **extra) as llm:
        outputs = llm.generate([np.array([], dtype=np.int64), np.array([], dtype=np.float32)], max_new_tokens=4)
    for index, output in enumerate(outputs):
        failure = output["error"]
        assert failure.type == "InvalidInputError" and failure.status_code is None
        for expected in (f"input {index}", "token-id prompt", "empty", "at least one token id"):
            assert expected in failure.message, failure.message
    assert sent(fake_vllm) == []


@pytest.mark.parametrize("flat", [[5, 6, 7], np.array([5, 6, 7])])
def test_token_ids_passed_as_the_inputs_themselves_say_to_wrap_them(fake_vllm, tokenizer_dir, flat):
    """``generate(ids)`` makes every id an input of its own: each error says to pass ``[ids]``."""
    with client(fake_vllm, tokenizer_dir) as llm:
        outputs = llm.generate(flat, max_new_tokens=4)
    for index, output in enumerate(outputs):
        failure = output["error"]
        assert failure.type == "InvalidInputError" and failure.status_code is None
        for expected in (f"input {index}", "got ", "token-id prompt", "generate([ids])"):
            assert expected in failure.message, failure.message
    assert sent(fake_vllm) == []


@pytest.mark.parametrize("nested", [[[5, 6, 7], [8, 9]], np.array([[5, 6, 7]]), [np.array([5, 6, 7])]])
def test_token_id_prompts_nested_in_one_input_say_each_is_an_input_of_its_own(fake_vllm, tokenizer_dir, nested):
    """``generate([[ids1, ids2]])`` (or a 2-D array as one input) is neither a conversation nor a token-id
    prompt: the error says to pass each prompt as an input, not to flatten a conversation."""
    with client(fake_vllm, tokenizer_dir) as llm:
        failure = llm.generate([nested], max_new_tokens=4)[0]["error"]
    assert failure.type == "InvalidInputError" and failure.status_code is None
    for expected in ("input 0", "token-id prompt", "generate([ids1, ids2])"):
        assert expected in failure.message, failure.message
    assert "flatten" not in failure.message
    assert sent(fake_vllm) == []
