"""Structured outputs against the real vLLM CPU server: the server constrains, the client checks.

The tiny model knows nothing of JSON, dates or yes/no, so whatever it writes that passes the local check
was shaped by the server's constraint. Schemas stay small and max_new_tokens modest (a 2-core machine).
Left free, the tiny model fills JSON with whitespace until max_new_tokens (then it is cut off and
invalid), and vLLM ignores disable_any_whitespace in a request (only the server's
--structured-outputs-config sets it), so the JSON tests ban the whitespace-only tokens with logit_bias.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from vllmclient import ClientvLLM, LocalServer

pytestmark = pytest.mark.integration

QUESTIONS = ["Tell me about the cat.", "Where is the ball?", "What does Anna like?"]


class Pet(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=30)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module", params=["template", "chat"])
def client(request: pytest.FixtureRequest, vllm_server: LocalServer, vllm_tokenizer_dir: Path) -> Iterator[ClientvLLM]:
    """Both paths: the client's template (/v1/completions) and the server's (/v1/chat/completions)."""
    tokenizer = str(vllm_tokenizer_dir) if request.param == "template" else None
    with ClientvLLM(base_url=vllm_server.base_url, tokenizer=tokenizer, max_retries=0) as llm:
        yield llm


@pytest.fixture(scope="module")
def no_whitespace(vllm_tokenizer_dir: Path) -> dict[str, float]:
    """A logit_bias that bans the tokens made only of whitespace."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(vllm_tokenizer_dir / "tokenizer.json"))
    ids = [i for i in range(tokenizer.get_vocab_size()) if (text := tokenizer.decode([i])) and not text.strip()]
    assert ids
    return {str(i): -100.0 for i in ids}


def test_json_without_the_ban_on_whitespace_is_cut_off_and_reported(client: ClientvLLM) -> None:
    output = client.generate([user(QUESTIONS[0])], structured_outputs=Pet, max_new_tokens=24, seed=3)[0]
    assert output["finish_reasons"] == ["length"] and output["generations"][0].startswith("{")
    assert output["parsed"] == [None]
    assert output["validation_errors"][0].startswith("cut off by max_new_tokens")


def test_a_pydantic_schema_gives_valid_instances(client: ClientvLLM, no_whitespace: dict[str, float]) -> None:
    outputs = client.generate([user(q) for q in QUESTIONS], num_generations=2, max_new_tokens=48, seed=3,
                              structured_outputs=Pet, logit_bias=no_whitespace)
    for output in outputs:
        assert "error" not in output
        assert output["validation_errors"] == [None, None], output["generations"]
        for text, pet in zip(output["generations"], output["parsed"], strict=True):
            assert isinstance(pet, Pet) and pet == Pet.model_validate(json.loads(text))
            assert len(pet.name) <= 10 and 0 <= pet.age <= 30


def test_a_json_schema_dict_gives_matching_dicts(client: ClientvLLM, no_whitespace: dict[str, float]) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["cat", "dog", "ball"]}}, "required": ["answer"]}
    output = client.generate([user(QUESTIONS[0])], num_generations=3, max_new_tokens=24, seed=1,
                             structured_outputs=schema, logit_bias=no_whitespace)[0]
    assert output["validation_errors"] == [None, None, None], output["generations"]
    assert [json.loads(text) for text in output["generations"]] == output["parsed"]
    assert all(value["answer"] in ("cat", "dog", "ball") for value in output["parsed"])


def test_a_regex_matches_in_full(client: ClientvLLM) -> None:
    pattern = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"  # [0-9], not \d: the same in Python and the server's backends
    output = client.generate([user("When is the party?")], num_generations=3, structured_outputs={"regex": pattern},
                             max_new_tokens=16, seed=2)[0]
    assert output["validation_errors"] == [None, None, None], output["generations"]
    assert output["parsed"] == output["generations"]
    assert all(re.fullmatch(pattern, text) for text in output["generations"])


def test_a_choice_is_one_of_the_choices(client: ClientvLLM) -> None:
    choices = ["yes", "no", "maybe"]
    outputs = client.generate([user(q) for q in QUESTIONS], num_generations=2,
                              structured_outputs={"choice": choices}, max_new_tokens=8, seed=4)
    for output in outputs:
        assert output["validation_errors"] == [None, None], output["generations"]
        assert output["parsed"] == output["generations"]
        assert all(value in choices for value in output["parsed"])
