"""Structured outputs: a spec checked once per call, sent in the server's form, every output checked locally.

``structured_outputs=`` takes:

- a pydantic model class: its JSON schema is sent; each output is validated with the model itself and
  ``parsed`` holds model instances;
- vLLM's form, a dict with exactly one kind key: ``{"json": schema}`` (a dict, JSON text or a pydantic
  class), ``{"regex": pattern}``, ``{"choice": [str, ...]}``, ``{"grammar": ebnf}``, ``{"json_object":
  True}`` or ``{"structural_tag": ...}``. vLLM's options beside the kind (``disable_any_whitespace``,
  ``disable_additional_properties``, ``whitespace_pattern``) are refused when set: vLLM's engine reads the
  first two only from the server's ``--structured-outputs-config`` and the third nowhere, so per request
  they are ignored without a word (vllm-project/vllm#48765, #26362; checked on vLLM 0.32). A model that
  pads JSON with whitespace until ``max_new_tokens`` needs ``vllm serve ... --structured-outputs-config
  '{"disable_any_whitespace": true}'`` (or a negative ``logit_bias`` on its whitespace tokens);
- any other dict: a JSON schema. It must use at least one JSON Schema keyword (``type``, ``properties``,
  ``enum``, ``$ref``, ...), so a misspelt kind such as ``{"choices": [...]}`` is refused instead of being
  sent as a schema that allows anything.

How each output is checked (``validation_errors[j]`` is ``None`` when it passes):

- JSON kinds: the text must parse as JSON and match the schema (``jsonschema``; ``format`` is not
  asserted, as JSON Schema's default) or the model; a generation cut off by ``max_new_tokens``
  (``finish_reason == "length"``) is invalid whatever it parses to, since the server stopped it mid-way.
- ``regex``: ``re.fullmatch`` (vLLM constrains the whole output). Python's ``re`` is not the dialect of
  vLLM's backends (xgrammar, guidance, outlines): ``\\d``, ``\\w`` and ``\\s`` match any Unicode digit,
  word or space character in Python but may be ASCII-only there, and lookarounds or backreferences that
  Python accepts are refused by the backends (the server answers 400). So on such patterns the local
  check can disagree with what the server enforced.
- ``choice``: the text must be one of the choices, exactly.
- ``grammar`` and ``structural_tag``: not checked locally (no parser here for vLLM's EBNF): the entry is
  ``None`` and ``parsed`` is the text.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema
from jsonschema import exceptions as schema_errors
from pydantic import BaseModel, ValidationError

from .errors import InvalidInputError
from .results import GenerateOutput

__all__ = ["StructuredSpec", "from_distilabel", "parse_spec"]

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# vLLM's per-request options: accepted by the server and ignored (see the module's docs); their no-op values.
_OPTIONS: dict[str, Any] = {"disable_any_whitespace": False, "disable_additional_properties": False,
                            "whitespace_pattern": None}
# The old request fields (vLLM < 0.12) for the kinds that had one.
_GUIDED = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}
# Keywords that make a dict a JSON schema that constrains something (annotations such as "title" do not).
_SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "items", "prefixItems", "enum", "const", "anyOf", "oneOf", "allOf", "not",
    "if", "$ref", "$defs", "definitions", "additionalProperties", "patternProperties", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern", "minItems",
    "maxItems", "uniqueItems", "contains", "minProperties", "maxProperties", "dependentRequired",
    "dependentSchemas", "propertyNames", "unevaluatedProperties", "unevaluatedItems", "$dynamicRef",
})
_JSON_KINDS = frozenset({"json", "json_object"})
_DISTILABEL_KEYS = frozenset({"schema", "format", "mode", "max_retries"})

Check = Callable[[str], tuple[Any, str | None]]


class StructuredSpec:
    """One call's constraint: what to send (``body_fields``) and how to check each output (``annotate``)."""

    def __init__(self, kind: str, value: Any, check: Check | None) -> None:
        self.kind, self.value = kind, value
        self._check = check

    def body_fields(self, *, guided: bool) -> dict[str, Any]:
        """The request fields: ``structured_outputs`` (vLLM >= 0.12), or the ``guided_*`` fields before."""
        if not guided:
            return {"structured_outputs": {self.kind: self.value}}
        if self.kind not in _GUIDED:
            raise InvalidInputError(
                f"structured_outputs {self.kind!r} has no equivalent in the guided_* fields that this server (vLLM < "
                "0.12) reads. Use json, regex, choice or grammar, or send the server's own field through extra_body."
            )
        return {_GUIDED[self.kind]: self.value}

    def check(self, text: str | None, finish_reason: str | None) -> tuple[Any, str | None]:
        """``(parsed, None)`` for a valid output, ``(None, why)`` otherwise."""
        if text is None:
            return None, "no generation: the input failed (see 'error')"
        if self.kind in _JSON_KINDS and finish_reason == "length":
            return None, ("cut off by max_new_tokens (finish_reason 'length'), so the JSON is incomplete: raise "
                          "max_new_tokens")
        if self._check is None:  # grammar, structural_tag: not checked here
            return text, None
        parsed, error = self._check(text)
        if error is not None and finish_reason == "length":
            error += " (cut off by max_new_tokens: finish_reason 'length')"
        return parsed, error

    def annotate(self, output: GenerateOutput) -> None:
        """Set ``parsed`` and ``validation_errors`` (one entry per generation) from the texts."""
        checked = [
            self.check(text, reason) for text, reason in zip(output["generations"], output["finish_reasons"], strict=True)
        ]
        output["parsed"] = [parsed for parsed, _ in checked]
        output["validation_errors"] = [error for _, error in checked]


def invalid_slots(output: GenerateOutput) -> list[int]:
    """The generations to ask again: invalid ones of an input that did not fail."""
    if "error" in output:
        return []
    return [j for j, error in enumerate(output.get("validation_errors") or ()) if error is not None]


def parse_spec(value: Any) -> StructuredSpec | None:
    """Check ``structured_outputs=`` once per call; raise ``InvalidInputError`` naming what to fix."""
    if value is None:
        return None
    if _is_model(value):
        return _json_spec(value)
    if not isinstance(value, Mapping):
        raise _invalid(value, "expected a JSON schema (dict), a pydantic model class or vLLM's form such as "
                              "{'choice': [...]}")
    kinds = [name for name in KINDS if name in value]
    if not kinds:
        return _json_spec(_plain_schema(value))
    given = [name for name in kinds if value[name] is not None]
    if len(given) != 1:
        raise _invalid(value, f"give exactly one of {', '.join(KINDS)} (vLLM refuses "
                              f"{'two kinds at once' if given else 'none'}); got {', '.join(given) or 'none set'}")
    others = [name for name in value if name not in KINDS and name not in _OPTIONS]
    if others:
        hints = [f"{name!r}" + _did_you_mean(name, [*KINDS, *_OPTIONS]) for name in others]
        raise _invalid(value, f"unknown key(s) {', '.join(hints)} beside {given[0]!r}")
    ignored = [name for name, no_op in _OPTIONS.items() if name in value and value[name] != no_op]
    if ignored:
        raise _invalid(value, f"{', '.join(ignored)} would be ignored: vLLM reads disable_any_whitespace and "
                              "disable_additional_properties only from the server's --structured-outputs-config (e.g. "
                              "vllm serve ... --structured-outputs-config '{\"disable_any_whitespace\": true}') and "
                              "whitespace_pattern nowhere; drop them from the request")
    kind = given[0]
    return _KIND_PARSERS[kind](value[kind])


def from_distilabel(value: Any) -> tuple[dict[str, Any] | type[BaseModel], int | None]:
    """distilabel's ``structured_output`` (``{"schema": ..., "format": "json", "mode": ..., "max_retries": N}``)
    → the schema (or model class) and the re-ask count. ``mode`` is instructor's and is ignored: vLLM
    constrains the decoding itself."""
    if not isinstance(value, Mapping) or "schema" not in value:
        raise ValueError(
            f"structured_output={value!r} is not supported: expected distilabel's form {{'schema': <pydantic model "
            "class or JSON schema dict>, 'format': 'json'}}. For a regex, a choice or a grammar, pass "
            "generation_kwargs={'structured_outputs': {'regex': ...}} (or 'choice', 'grammar') instead."
        )
    unknown = sorted(set(value) - _DISTILABEL_KEYS)
    if unknown:
        raise ValueError(f"structured_output has unknown key(s) {', '.join(map(repr, unknown))}; distilabel's keys "
                         f"are {', '.join(sorted(_DISTILABEL_KEYS))}")
    if value.get("format", "json") not in ("json", None):
        raise ValueError(
            f"structured_output format={value['format']!r} is not supported: only 'json' (a schema). For a regex, "
            "pass generation_kwargs={'structured_outputs': {'regex': pattern}} instead."
        )
    retries = value.get("max_retries")
    if retries is not None and (type(retries) is not int or retries < 0):
        raise ValueError(f"structured_output max_retries={retries!r} must be an int >= 0")
    schema = value["schema"]
    if not (_is_model(schema) or isinstance(schema, Mapping)):
        raise ValueError(f"structured_output schema={schema!r} must be a pydantic model class or a JSON schema dict")
    try:
        parse_spec({"json": schema})  # an invalid schema fails here, at construction
    except InvalidInputError as exc:
        raise ValueError(str(exc).replace("structured_outputs", "structured_output['schema']", 1)) from None
    return (schema if _is_model(schema) else dict(schema)), retries


# -- the kinds ----------------------------------------------------------------------------------------


def _json_spec(schema: Any) -> StructuredSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise _invalid(schema, f"json is not valid JSON text ({exc})") from None
    if _is_model(schema):
        model: type[BaseModel] = schema
        return StructuredSpec("json", model.model_json_schema(), lambda text: _check_model(model, text))
    if not isinstance(schema, Mapping):
        raise _invalid(schema, "json must be a JSON schema (a dict, or its JSON text) or a pydantic model class")
    schema = dict(schema)
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _invalid(schema, f"the JSON schema cannot be sent as JSON ({exc})") from None
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator_class.check_schema(schema)
    except schema_errors.SchemaError as exc:
        raise _invalid(schema, f"not a valid JSON schema: {exc.message} (at {exc.json_path})") from None
    _check_refs(schema, schema)
    validator = validator_class(schema)
    return StructuredSpec("json", schema, lambda text: _check_schema(validator, text))


def _json_object(value: Any) -> StructuredSpec:
    if value is not True:
        raise _invalid(value, "json_object must be True (any JSON object)")
    return StructuredSpec("json_object", True, _check_object)


def _regex(value: Any) -> StructuredSpec:
    pattern = _compiled(value, "regex")
    return StructuredSpec(
        "regex", value,
        lambda text: (text, None) if pattern.fullmatch(text) else (None, f"does not match the regex {value!r} in full"),
    )


def _choice(value: Any) -> StructuredSpec:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise _invalid(value, "choice must be a non-empty list of str, e.g. {'choice': ['yes', 'no']}")
    choices = frozenset(value)
    return StructuredSpec(
        "choice", value,
        lambda text: (text, None) if text in choices else (None, f"{_short(text)} is not one of the choices"),
    )


def _unchecked(kind: str) -> Callable[[Any], StructuredSpec]:
    def parse(value: Any) -> StructuredSpec:
        if kind == "grammar" and (not isinstance(value, str) or not value.strip()):
            raise _invalid(value, "grammar must be a non-empty str (an EBNF grammar)")
        if kind == "structural_tag" and not isinstance(value, (str, Mapping)):
            raise _invalid(value, "structural_tag must be a str or a dict, as vLLM takes it")
        return StructuredSpec(kind, value, None)

    return parse


_KIND_PARSERS: dict[str, Callable[[Any], StructuredSpec]] = {
    "json": _json_spec, "json_object": _json_object, "regex": _regex, "choice": _choice,
    "grammar": _unchecked("grammar"), "structural_tag": _unchecked("structural_tag"),
}


# -- checks -------------------------------------------------------------------------------------------


def _check_schema(validator: Any, text: str) -> tuple[Any, str | None]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, f"not valid JSON ({exc})"
    error = schema_errors.best_match(validator.iter_errors(value))
    if error is not None:
        return None, f"does not match the schema at {error.json_path}: {error.message}"
    return value, None


def _check_model(model: type[BaseModel], text: str) -> tuple[Any, str | None]:
    try:
        return model.model_validate_json(text), None
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, error['loc'])) or '(root)'}: {error['msg']}" for error in exc.errors()[:3]]
        return None, f"does not match {model.__name__}: {'; '.join(problems)}"
    except Exception as exc:  # noqa: BLE001 - a validator of the caller's model raised something pydantic does not wrap
        return None, f"{model.__name__}'s validation raised {exc.__class__.__name__}: {exc}"


def _check_object(text: str) -> tuple[Any, str | None]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, f"not valid JSON ({exc})"
    return (value, None) if isinstance(value, dict) else (None, "valid JSON but not an object")


# -- helpers ------------------------------------------------------------------------------------------


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _plain_schema(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """A dict without a kind key is a JSON schema, if it is one that constrains something."""
    if "schema" in value and "format" in value:
        raise _invalid(value, "this is distilabel's structured_output form; pass its schema itself "
                              "(structured_outputs=schema) or {'json': schema}")
    if not _SCHEMA_KEYWORDS.intersection(value):
        hints = "".join(_did_you_mean(name, KINDS) for name in value)
        raise _invalid(value, "neither vLLM's form (a dict with one of " + ", ".join(KINDS) + ") nor a JSON schema "
                              "(no keyword such as 'type', 'properties' or 'enum'; for any JSON object use "
                              "{'json_object': True})" + hints)
    return value


def _check_refs(node: Any, root: Mapping[str, Any]) -> None:
    """A ``$ref`` the server cannot resolve fails every generation: refuse it before sending."""
    if isinstance(node, Mapping):
        ref = node.get("$ref")
        if isinstance(ref, str):
            if not ref.startswith("#"):
                raise _invalid(ref, "a $ref points outside the schema, where the server cannot follow it; put the "
                                    "definition under $defs")
            target: Any = root
            for part in ref[1:].split("/")[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, Mapping) else None
                if target is None:
                    raise _invalid(ref, "a $ref points to nothing in the schema")
        for child in node.values():
            _check_refs(child, root)
    elif isinstance(node, list):
        for child in node:
            _check_refs(child, root)


def _compiled(pattern: Any, name: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise _invalid(pattern, f"{name} must be a str (a regular expression)")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise _invalid(pattern, f"{name} is not a valid regular expression ({exc})") from None


def _did_you_mean(name: str, known: Any) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _invalid(value: Any, why: str) -> InvalidInputError:
    return InvalidInputError(f"structured_outputs is invalid: {why} (got {_short(value)}).")
