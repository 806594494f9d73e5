"""Structured outputs (issue 8, item 6): the typed ``structured_outputs=`` parameter, sent in the form the
server reads, every output checked locally, invalid generations re-asked; distilabel's ``structured_output``."""

from __future__ import annotations

import asyncio
import inspect
import json

import pytest
from pydantic import BaseModel, field_validator

from vllmclient import ClientvLLM, ConfigurationError, InvalidInputError

from fake_vllm import error_body

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
          "required": ["city", "year"]}
DATE = r"\d{4}-\d\d-\d\d"


class Person(BaseModel):
    name: str
    age: int


class Team(BaseModel):  # a nested model: its schema uses $defs and $ref
    lead: Person
    size: int


def user(content):
    return [{"role": "user", "content": content}]


def completions(server):
    return [request.body for request in server.requests_to("/v1/completions")]


def chats(server):
    return [request.body for request in server.requests_to("/v1/chat/completions")]


def bodies(server, chat):
    return chats(server) if chat else completions(server)


@pytest.fixture(params=["template", "chat"])
def path(request):
    return request.param


@pytest.fixture
def client(fake_vllm, tokenizer_dir, path):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir if path == "template" else None,
                    max_retries=0) as llm:
        yield llm


@pytest.fixture
def llm(fake_vllm, tokenizer_dir):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, max_retries=0) as client:
        yield client


# -- every form, sent as structured_outputs and checked -----------------------------------------------

FORMS = [  # (structured_outputs=, what is sent, the parsed type)
    (Person, {"json": Person.model_json_schema()}, Person),
    (Team, {"json": Team.model_json_schema()}, Team),
    (SCHEMA, {"json": SCHEMA}, dict),
    ({"json": SCHEMA}, {"json": SCHEMA}, dict),
    ({"json": json.dumps(SCHEMA)}, {"json": SCHEMA}, dict),
    ({"json": Person}, {"json": Person.model_json_schema()}, Person),
    ({"choice": ["yes", "no"]}, {"choice": ["yes", "no"]}, str),
    ({"regex": DATE}, {"regex": DATE}, str),
    ({"grammar": "root ::= [0-9-]+"}, {"grammar": "root ::= [0-9-]+"}, str),
    ({"json_object": True}, {"json_object": True}, dict),
    ({"json": SCHEMA, "disable_any_whitespace": False, "whitespace_pattern": None}, {"json": SCHEMA}, dict),  # no-ops
]


@pytest.mark.parametrize(("spec", "sent", "kind"), FORMS)
def test_each_form_is_sent_as_structured_outputs_and_each_output_checked(client, fake_vllm, path, spec, sent, kind):
    output = client.generate([user("When? [[2024-05-17]]")], num_generations=3, structured_outputs=spec)[0]
    (body,) = bodies(fake_vllm, chat=path == "chat")
    assert body["structured_outputs"] == sent
    assert not [key for key in body if key.startswith("guided_")]
    assert output["validation_errors"] == [None, None, None]
    assert all(isinstance(value, kind) for value in output["parsed"])
    for text, value in zip(output["generations"], output["parsed"], strict=True):
        if kind is str:
            assert value == text
        elif kind is dict:
            assert value == json.loads(text)
        else:
            assert value == kind.model_validate_json(text)
    if "choice" in sent:
        assert set(output["parsed"]) <= {"yes", "no"}


def test_agenerate_checks_too(client):
    output = asyncio.run(client.agenerate(user("hi"), num_generations=2, structured_outputs=Person))
    assert output["validation_errors"] == [None, None]
    assert all(isinstance(person, Person) for person in output["parsed"])


def test_without_structured_outputs_there_are_no_structured_keys(client):
    output = client.generate([user("hi")])[0]
    assert "parsed" not in output and "validation_errors" not in output


# -- the server's form --------------------------------------------------------------------------------

OLD_FORMS = [
    (Person, {"guided_json": Person.model_json_schema()}),
    ({"regex": DATE}, {"guided_regex": DATE}),
    ({"choice": ["yes", "no"]}, {"guided_choice": ["yes", "no"]}),
    ({"grammar": "root ::= [0-9-]+"}, {"guided_grammar": "root ::= [0-9-]+"}),
]


@pytest.mark.parametrize(("spec", "sent"), OLD_FORMS)
@pytest.mark.parametrize("mode", ["template", "chat"])
def test_a_server_before_0_12_gets_the_guided_fields(make_fake_vllm, tokenizer_dir, mode, spec, sent):
    old = make_fake_vllm(version="0.11.2")  # it reads only guided_*: structured_outputs would give free text
    with ClientvLLM(base_url=old.base_url, tokenizer=tokenizer_dir if mode == "template" else None) as llm:
        output = llm.generate([user("When? [[2024-05-17]]")], num_generations=2, structured_outputs=spec)[0]
    (body,) = bodies(old, chat=mode == "chat")
    assert {key: body[key] for key in sent} == sent
    assert "structured_outputs" not in body
    assert output["validation_errors"] == [None, None]


@pytest.mark.parametrize("spec", [{"json_object": True}, {"structural_tag": "{}"}])
def test_a_server_before_0_12_refuses_what_the_guided_fields_cannot_say(make_fake_vllm, tokenizer_dir, spec):
    old = make_fake_vllm(version="0.11.2")
    with (ClientvLLM(base_url=old.base_url, tokenizer=tokenizer_dir) as llm,
          pytest.raises(InvalidInputError, match="no equivalent in the guided_. fields.*extra_body")):
        llm.generate([user("x")], structured_outputs=spec)
    assert completions(old) == []


def test_a_server_without_a_version_gets_structured_outputs(make_fake_vllm, tokenizer_dir):
    unknown = make_fake_vllm(version="")
    with ClientvLLM(base_url=unknown.base_url, tokenizer=tokenizer_dir) as llm:
        output = llm.generate([user("x")], structured_outputs={"choice": ["a", "b"]})[0]
    assert completions(unknown)[0]["structured_outputs"] == {"choice": ["a", "b"]}
    assert output["validation_errors"] == [None]


# -- bad specs fail the call before sending -----------------------------------------------------------

BAD = [
    ({"json": SCHEMA, "regex": "a"}, "exactly one of json, regex.*two kinds at once"),
    ({"json": None}, "exactly one of.*none"),
    ({"choice": "yes"}, "choice must be a non-empty list of str"),
    ({"choice": ["yes", 1]}, "choice must be a non-empty list of str"),
    ({"choice": []}, "choice must be a non-empty list of str"),
    ({"regex": "(unclosed"}, "regex is not a valid regular expression"),
    ({"regex": 5}, "regex must be a str"),
    ({"grammar": ""}, "grammar must be a non-empty str"),
    ({"json_object": False}, "json_object must be True"),
    ({"type": "objec"}, "not a valid JSON schema: 'objec' is not valid.*at \\$.type"),
    ({"json": {"type": "object", "required": "city"}}, "not a valid JSON schema"),
    ({"json": "{not json"}, "json is not valid JSON text"),
    ({"json": ["a"]}, "json must be a JSON schema"),
    ({"$ref": "#/$defs/Missing"}, "a \\$ref points to nothing"),
    ({"$ref": "https://example.com/s.json"}, "points outside the schema"),
    ({"type": "number", "maximum": float("nan")}, "cannot be sent as JSON"),
    ({"choice": ["yes", "no\udcff"]}, r"cannot be sent as JSON: it holds '\\udcff', a lone surrogate"),
    ({"choices": ["yes", "no"]}, "neither vLLM's form.*nor a JSON schema.*did you mean 'choice'"),
    ({}, "neither vLLM's form.*json_object"),
    ({"schema": SCHEMA, "format": "json"}, "distilabel's structured_output form.*structured_outputs=schema"),
    ({"choice": ["a"], "temprature": 1}, "unknown key.*'temprature'"),
    ({"json": SCHEMA, "disable_any_whitespace": True},
     "disable_any_whitespace would be ignored: vLLM reads.*only from the server's --structured-outputs-config"),
    ({"json": SCHEMA, "disable_additional_properties": True, "whitespace_pattern": " ?"},
     "disable_additional_properties, whitespace_pattern would be ignored"),
    (Person(name="x", age=1), "structured_outputs=.*Expected: A JSON schema"),
    ("a|b", "structured_outputs=.*Expected: A JSON schema"),
]


@pytest.mark.parametrize(("spec", "message"), BAD)
def test_a_bad_spec_fails_the_call_before_sending(client, fake_vllm, path, spec, message):
    with pytest.raises(InvalidInputError, match=message):
        client.generate([user("x"), user("y")], structured_outputs=spec)
    with pytest.raises(InvalidInputError, match=message):
        asyncio.run(client.agenerate(user("x"), structured_outputs=spec))
    assert bodies(fake_vllm, chat=path == "chat") == []


def test_structured_outputs_clashing_with_extra_body_is_refused(llm, fake_vllm):
    for extra in ({"structured_outputs": {"choice": ["a"]}}, {"response_format": {"type": "json_object"}}):
        with pytest.raises(InvalidInputError, match="both constrain the output"):
            llm.generate([user("x")], structured_outputs=SCHEMA, extra_body=extra)
    assert completions(fake_vllm) == []


def test_re_asking_with_greedy_decoding_is_refused(llm, fake_vllm):
    with pytest.raises(InvalidInputError, match="temperature=0 would repeat.*temperature > 0"):
        llm.generate([user("x")], structured_outputs=SCHEMA, structured_outputs_retries=1, temperature=0)
    llm.generate([user("x")], structured_outputs=SCHEMA, temperature=0)  # no re-asks: fine
    assert len(completions(fake_vllm)) == 1


def test_the_parameters_are_in_agenerate_signature_and_the_runtime_info(llm):
    parameters = inspect.signature(ClientvLLM.agenerate).parameters
    assert parameters["structured_outputs"].default is None
    assert parameters["structured_outputs_retries"].default == 0
    names = ClientvLLM().runtime_parameters_names
    assert names["generation_kwargs"]["structured_outputs"] is True
    assert names["generation_kwargs"]["structured_outputs_retries"] is True
    with pytest.raises(InvalidInputError, match="structured_outputs_retries=-1 is invalid"):
        asyncio.run(llm.agenerate(user("x"), structured_outputs_retries=-1))


# -- invalid outputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "why"), [
    (SCHEMA, "not valid JSON"),
    (Person, "does not match Person"),
    ({"json_object": True}, "not valid JSON"),
    ({"choice": ["yes", "no"]}, "is not one of the choices"),
    ({"regex": DATE}, "does not match the regex"),
])
def test_an_invalid_output_has_its_reason_and_no_parsed_value(client, fake_vllm, spec, why):
    fake_vllm.break_structured("odd", times=1)  # the first generation of this prompt is free text
    output = client.generate([user("an odd one [[2024-05-17]]")], num_generations=2, structured_outputs=spec)[0]
    assert why in output["validation_errors"][0]
    assert output["parsed"][0] is None
    assert output["validation_errors"][1] is None and output["parsed"][1] is not None


def test_a_schema_that_does_not_match_says_where(llm, fake_vllm):
    strict = {**SCHEMA, "properties": {**SCHEMA["properties"], "year": {"type": "string"}}}
    output = llm.generate([user("x")], structured_outputs={"json": SCHEMA})[0]
    assert output["validation_errors"] == [None]
    # The same answer checked against a schema it does not meet (the fake answers the first one).
    from vllmclient.structured import parse_spec

    parsed, why = parse_spec(strict).check(output["generations"][0], "stop")
    assert parsed is None and why.startswith("does not match the schema at $.year:")


def test_json_cut_off_by_max_new_tokens_is_invalid_with_that_reason(client):
    output = client.generate([user("x")], num_generations=2, structured_outputs=SCHEMA, max_new_tokens=3)[0]
    assert output["finish_reasons"] == ["length", "length"]
    assert output["parsed"] == [None, None]
    assert all("cut off by max_new_tokens" in why for why in output["validation_errors"])


def test_a_regex_output_cut_off_says_so(client):
    output = client.generate([user("[[2024-05-17]]")], structured_outputs={"regex": DATE}, max_new_tokens=2)[0]
    assert output["finish_reasons"] == ["length"]
    assert "does not match the regex" in output["validation_errors"][0]
    assert "cut off by max_new_tokens" in output["validation_errors"][0]


def test_a_grammar_is_not_checked_locally(llm, fake_vllm):
    fake_vllm.break_structured("x", times=1)
    output = llm.generate([user("x")], structured_outputs={"grammar": "root ::= 'a'"})[0]
    assert output["validation_errors"] == [None]
    assert output["parsed"] == output["generations"]


def test_a_failed_input_has_the_structured_keys_too(llm, fake_vllm):
    fake_vllm.fail_prompts_containing("boom")
    first, failed = llm.generate([user("fine"), user("boom")], num_generations=2, structured_outputs=SCHEMA)
    assert first["validation_errors"] == [None, None]
    assert "error" in failed and failed["parsed"] == [None, None]
    assert all("the input failed" in why for why in failed["validation_errors"])


# -- asking again -------------------------------------------------------------------------------------


def test_only_the_invalid_generations_are_asked_again_with_new_seeds(llm, fake_vllm):
    inputs = [user("alpha"), user("beta"), user("gamma")]
    baseline = llm.generate(inputs, num_generations=2, structured_outputs=SCHEMA, seed=11, logprobs=1)
    fake_vllm.clear()
    fake_vllm.break_structured("beta", times=1)
    outputs = llm.generate(inputs, num_generations=2, structured_outputs=SCHEMA, seed=11, logprobs=1,
                           structured_outputs_retries=2)
    first, again = completions(fake_vllm)
    assert first["n"] == 2 and len(first["prompt"]) == 3
    assert again["n"] == 1 and len(again["prompt"]) == 1 and "beta" in again["prompt"][0]
    assert again["seed"] == 11 + 1 * 2  # attempt 1 starts past the seeds 11, 12 the first answer used
    assert [output["validation_errors"] for output in outputs] == [[None, None]] * 3
    assert outputs[0]["generations"] == baseline[0]["generations"]
    assert outputs[2]["generations"] == baseline[2]["generations"]
    beta = outputs[1]
    assert beta["generations"][1] == baseline[1]["generations"][1]  # the valid one is kept
    assert beta["parsed"][0] == json.loads(beta["generations"][0])
    tokens = beta["statistics"]["output_tokens"][0]
    assert len(beta["logprobs"][0]) == tokens  # what goes with the generation came with it


def test_re_asking_gives_up_after_the_retries(client, fake_vllm, path):
    output = client.generate([user("x")], num_generations=2, structured_outputs=SCHEMA, max_new_tokens=3, seed=5,
                             structured_outputs_retries=2)[0]
    sent = bodies(fake_vllm, chat=path == "chat")
    assert [(body["n"], body["seed"]) for body in sent] == [(2, 5), (2, 7), (2, 9)]
    assert output["parsed"] == [None, None]
    assert all("cut off by max_new_tokens" in why for why in output["validation_errors"])


def test_re_asking_without_a_seed_sends_none(client, fake_vllm, path):
    fake_vllm.break_structured("x", times=1)
    output = client.generate([user("x")], structured_outputs=Person, structured_outputs_retries=1)[0]
    first, again = bodies(fake_vllm, chat=path == "chat")
    assert "seed" not in first and "seed" not in again
    assert output["validation_errors"] == [None] and isinstance(output["parsed"][0], Person)


def test_agenerate_asks_again(client, fake_vllm, path):
    fake_vllm.break_structured("x", times=2)
    output = asyncio.run(client.agenerate(user("x"), num_generations=3, structured_outputs={"choice": ["a", "b"]},
                                          structured_outputs_retries=1))
    assert [body["n"] for body in bodies(fake_vllm, chat=path == "chat")] == [3, 2]
    assert output["validation_errors"] == [None, None, None]
    assert set(output["parsed"]) <= {"a", "b"}


def test_a_failed_re_ask_keeps_the_first_answer_and_says_why(llm, fake_vllm):
    fake_vllm.break_structured("x", times=1)
    # The re-ask (seeds from 5 + 2) fails with a 400 about a call-wide parameter: not split, not retried.
    fake_vllm.fail_next(400, body=error_body(400, "no room", param="max_tokens"), match='"seed":7')
    output = llm.generate([user("x")], num_generations=2, structured_outputs=SCHEMA, structured_outputs_retries=3,
                          seed=5)[0]
    assert "error" not in output
    assert len(completions(fake_vllm)) == 2  # a failed re-ask is not sent again
    assert output["validation_errors"][0].startswith("not valid JSON")
    assert "asking again failed (BadRequestError: The server rejected the request (HTTP 400): no room)" in output["validation_errors"][0]
    assert output["validation_errors"][1] is None and output["parsed"][1] is not None


def test_re_asks_are_packed_and_split_like_any_pack(llm, fake_vllm):
    for marker in ("beta", "delta"):
        fake_vllm.break_structured(marker, times=1)
    fake_vllm.fail_next(400, match='"seed":4')  # the re-ask pack is refused naming no parameter: it is split
    inputs = [user(word) for word in ("alpha", "beta", "gamma", "delta")]
    outputs = llm.generate(inputs, structured_outputs=SCHEMA, structured_outputs_retries=1, seed=3)
    sent = completions(fake_vllm)
    assert [len(body["prompt"]) for body in sent] == [4, 2, 1, 1]
    assert [output["validation_errors"] for output in outputs] == [[None]] * 4


def test_re_asks_hold_capacity_like_any_request(fake_vllm, tokenizer_dir):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, max_concurrency=4, pack_size=2) as llm:
        for i in range(0, 40, 3):
            fake_vllm.break_structured(f"input {i}.", times=2)
        outputs = llm.generate([user(f"input {i}.") for i in range(40)], num_generations=2, structured_outputs=SCHEMA,
                               structured_outputs_retries=1)
    assert all(output["validation_errors"] == [None, None] for output in outputs)
    sent = [(len(body["prompt"]), body["n"]) for body in completions(fake_vllm)]
    assert sorted(sent) == [(1, 2)] * 14 + [(2, 2)] * 20  # 20 packs of two, then 14 re-asks of one input's two
    assert fake_vllm.max_in_flight_sequences <= 4


# -- distilabel's structured_output -------------------------------------------------------------------


def test_distilabels_structured_output_applies_to_every_call(fake_vllm, tokenizer_dir):
    llm = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir,
                     structured_output={"schema": Person, "format": "json", "mode": "json", "max_retries": 1})
    with llm:
        fake_vllm.break_structured("x", times=1)
        output = llm.generate([user("x")])[0]
        assert isinstance(output["parsed"][0], Person) and output["validation_errors"] == [None]
        assert len(completions(fake_vllm)) == 2  # max_retries: instructor's re-asks, here ours
        assert completions(fake_vllm)[0]["structured_outputs"] == {"json": Person.model_json_schema()}
        output = asyncio.run(llm.agenerate(user("y")))
        assert isinstance(output["parsed"][0], Person)
        output = llm.generate([user("z")], structured_outputs={"choice": ["a"]})[0]  # a call's own wins
        assert output["parsed"] == ["a"]
        output = llm.generate([user("z")], structured_outputs=None)[0]  # and None turns it off
        assert "parsed" not in output and "structured_outputs" not in completions(fake_vllm)[-1]


def test_distilabels_structured_output_takes_a_schema_dict_and_is_a_runtime_parameter(fake_vllm, tokenizer_dir):
    with ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir) as llm:
        assert llm.runtime_parameters_names["structured_output"] is True
        llm.set_runtime_parameters({"structured_output": {"schema": SCHEMA}})
        output = llm.generate([user("x")])[0]
    assert completions(fake_vllm)[0]["structured_outputs"] == {"json": SCHEMA}
    assert output["validation_errors"] == [None] and isinstance(output["parsed"][0], dict)


@pytest.mark.parametrize(("value", "message"), [
    ({"format": "regex", "schema": DATE}, "format='regex' is not supported.*structured_outputs.*regex"),
    ({"format": "json"}, "expected distilabel's form.*'schema'"),
    ({"schema": SCHEMA, "strict": True}, "unknown key.*'strict'"),
    ({"schema": {"type": "objec"}}, "structured_output\\['schema'\\] is invalid: not a valid JSON schema"),
    ({"schema": "a|b"}, "must be a pydantic model class or a JSON schema dict"),
    ({"schema": SCHEMA, "max_retries": -1}, "max_retries=-1 must be an int >= 0"),
])
def test_other_forms_of_structured_output_are_refused_at_construction(value, message):
    with pytest.raises(ConfigurationError, match=message):
        ClientvLLM(structured_output=value)
    with pytest.raises(ConfigurationError, match=message):
        ClientvLLM().set_runtime_parameters({"structured_output": value})


def test_a_bad_spec_in_generation_kwargs_fails_when_set():
    with pytest.raises(ConfigurationError, match="generation_kwargs: structured_outputs is invalid.*'choice'"):
        ClientvLLM(generation_kwargs={"structured_outputs": {"choices": ["a", "b"]}})
    ClientvLLM(generation_kwargs={"structured_outputs": Person, "structured_outputs_retries": 1})


# -- checkpoints --------------------------------------------------------------------------------------


def test_a_checkpoint_with_a_model_class_resumes_with_model_instances(llm, fake_vllm, tmp_path):
    job = tmp_path / "job.jsonl"
    first = llm.generate([user("a"), user("b")], structured_outputs=Person, checkpoint=job)
    saved = [json.loads(line) for line in job.read_text().splitlines()[1:]]
    assert all("parsed" not in record["output"] for record in saved)  # instances are rebuilt, not saved
    fake_vllm.clear()
    again = llm.generate([user("a"), user("b"), user("c")], structured_outputs=Person, checkpoint=job)
    assert [body["prompt"] for body in completions(fake_vllm)] == [[llm._formatter.render(user("c"))]]
    assert again[:2] == first
    assert all(isinstance(output["parsed"][0], Person) for output in again)
    # The same schema as a dict is the same request: it resumes, with dicts.
    as_dict = llm.generate([user("a"), user("b"), user("c")], structured_outputs=Person.model_json_schema(),
                           checkpoint=job)
    assert as_dict[0]["parsed"] == [first[0]["parsed"][0].model_dump()]


def test_json_cut_off_is_invalid_even_when_what_came_parses(llm):
    number = {"type": "integer", "minimum": 1000, "maximum": 9999}  # four digits: two or three tokens
    output = llm.generate([user("x")], structured_outputs=number, max_new_tokens=1, seed=1)[0]
    assert output["finish_reasons"] == ["length"] and json.loads(output["generations"][0]) < 1000
    assert output["parsed"] == [None]
    assert output["validation_errors"][0].startswith("cut off by max_new_tokens (finish_reason 'length')")


class Picky(BaseModel):
    name: str
    age: int

    @field_validator("name")
    @classmethod
    def _lookup(cls, value):
        raise KeyError("surprise")  # not a ValueError: pydantic lets it through


def test_a_model_whose_validation_raises_anything_makes_that_output_invalid_not_the_input_failed(llm):
    output = llm.generate([user("x")], structured_outputs=Picky)[0]
    assert "error" not in output
    assert output["validation_errors"] == ["Picky's validation raised KeyError: 'surprise'"]
