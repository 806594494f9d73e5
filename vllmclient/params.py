"""The generation parameters, described once: names, types, ranges and docs.

``GenerationParams`` is the one source of ``agenerate``'s signature, of distilabel's runtime-parameter
info (``generation_kwargs``) and of the request body (``_request.build_request``). Values are checked
strictly (no ``"0.7"`` → 0.7 coercion, no ``True`` for an int, no NaN or infinity; numpy numbers are
numbers) once per call, with vLLM's own rules (ranges, empty stop strings, tool choices), so a bad value
fails the call before anything is sent, never once per pack at the server.

Names are vLLM's and the OpenAI API's, except distilabel's ``max_new_tokens`` (sent as ``max_tokens``).
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidInputError

__all__ = ["GenerationParams", "parse_params"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # vLLM's range for seed and priority


class GenerationParams(BaseModel):
    """Every sampling and request parameter a generate call takes (``num_generations`` aside).

    Left as ``None``, a vLLM parameter is not sent, so the server's (and the model's
    ``generation_config``) default applies.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    def __init__(self, **values: Any) -> None:
        """Raises ``InvalidInputError`` (never pydantic's ``ValidationError``) naming each bad value."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidInputError(_describe(exc, values)) from None

    # -- distilabel's (and the OpenAI API's) ---------------------------------------------------------
    max_new_tokens: int = Field(
        128, ge=1, description="An int >= 1: the most tokens to generate per generation (vLLM: max_tokens)."
    )
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="A number in [-2, 2].")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (an int >= 0, or its str) -> bias added to its logit, a finite number."
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="A number in [-2, 2].")
    temperature: float = Field(1.0, ge=0, le=2, description="A number in [0, 2]; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="A number in (0, 1].")
    # -- vLLM's sampling ------------------------------------------------------------------------------
    top_k: int | None = Field(None, ge=-1, description="An int >= -1 (0 or -1 disables it).")
    min_p: float | None = Field(None, ge=0, le=1, description="A number in [0, 1].")
    repetition_penalty: float | None = Field(None, gt=0, description="A number > 0 (1 disables it).")
    seed: int | None = Field(
        None, ge=_INT64_MIN, le=_INT64_MAX, description="A 64-bit int: the same seed gives the same text."
    )
    stop: str | list[str] | None = Field(None, description="A non-empty str, or a list of them, that end generation.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="A list of token ids (ints >= 0) that end a generation."
    )
    include_stop_str_in_output: bool | None = Field(None, description="Keep the stop string in the text.")
    min_tokens: int | None = Field(None, ge=0, description="An int >= 0: tokens before EOS or stop may end it.")
    ignore_eos: bool | None = Field(None, description="Keep generating past the end-of-sequence token.")
    skip_special_tokens: bool | None = Field(None, description="Drop special tokens from the text.")
    logprobs: int | None = Field(
        None, ge=0, description="How many top tokens to return with each generated token's logprob (an int >= 0)."
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, description="How many top tokens to return with each prompt token's logprob (an int >= 0)."
    )
    # -- the prompt -----------------------------------------------------------------------------------
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="Keep only this many prompt tokens (-1: as many as the context allows, less one)."
    )
    truncation_side: Literal["left", "right"] | None = Field(
        None, description="Which end truncate_prompt_tokens cuts: 'left' keeps the prompt's end."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables for the chat template (e.g. {'enable_thinking': False})."
    )
    # -- structured outputs (see vllmclient.structured) -------------------------------------------------
    structured_outputs: dict[str, Any] | type[BaseModel] | None = Field(
        None, description="A JSON schema (dict), a pydantic model class, or vLLM's form: {'json': schema}, "
        "{'regex': pattern}, {'choice': [str, ...]}, {'grammar': ebnf}, {'json_object': True} or "
        "{'structural_tag': ...}, with vLLM's options beside it (disable_any_whitespace, "
        "disable_additional_properties, whitespace_pattern). Each output is checked: see 'parsed' and "
        "'validation_errors' in the results.",
    )
    structured_outputs_retries: int = Field(
        0, ge=0, description="Ask again, up to this many times, for the generations that fail the structured_outputs "
        "check (only those; with a seed, each re-ask uses new seeds).",
    )
    # -- the chat path (tokenizer=None) ---------------------------------------------------------------
    tools: list[dict[str, Any]] | None = Field(
        None, description="OpenAI tool definitions; needs tokenizer=None and a server with --tool-call-parser."
    )
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description="'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}."
    )
    # -- the request ----------------------------------------------------------------------------------
    model: str | None = Field(None, description="A served model or LoRA adapter for this call (see GET /v1/models).")
    priority: int | None = Field(
        None, ge=_INT64_MIN, le=_INT64_MAX,
        description="A 64-bit int: scheduling priority (lower runs first); vLLM honours it only with "
        "--scheduling-policy priority, and ignores it otherwise.",
    )
    extra_body: dict[str, Any] | None = Field(
        None, description="Other vLLM request fields, sent as they are (unknown ones are warned about)."
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numpy_int_is_int(cls, value: Any) -> Any:
        return plain_int(value)

    @field_validator("logprobs", "prompt_logprobs", mode="before")
    @classmethod
    def _true_is_one(cls, value: Any) -> Any:
        return 1 if value is True else value

    @field_validator("stop", "stop_token_ids", "tools", mode="before")
    @classmethod
    def _sequence_is_list(cls, value: Any) -> Any:
        if hasattr(value, "tolist") and not isinstance(value, str):  # a numpy array
            value = value.tolist()
        return [plain_int(item) for item in value] if isinstance(value, (tuple, list)) else value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _int_keys_are_str(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            keys = [plain_int(key) for key in value]
            return {
                str(key) if isinstance(key, int) and not isinstance(key, bool) else key: v
                for key, v in zip(keys, value.values(), strict=True)
            }
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or ():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(
                    f"the key {key!r} is not a token id; keys are token ids (an int >= 0, or its str): find a "
                    "word's ids with the tokenizer"
                )
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError("an empty stop string would match everywhere and vLLM refuses it; remove it")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("0 would keep no prompt at all; use -1 (as much as fits) or an int >= 1")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GenerationParams:
        """Rules across parameters that vLLM would otherwise refuse for every pack of the call."""
        if self.min_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} is more than max_new_tokens={self.max_new_tokens}, which vLLM "
                "refuses. Lower min_tokens or raise max_new_tokens."
            )
        _check_tools(self.tools, self.tool_choice)
        return self


def plain_int(value: Any) -> Any:
    """A numpy (or other ``numbers.Integral``) integer as an ``int``: strict checking refuses it otherwise."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
        return int(value)
    return value


def _check_tools(tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None) -> None:
    """vLLM's rules for ``tools`` and ``tool_choice`` (the chat path), as ValueError naming the fix."""
    if tools == []:
        raise ValueError("tools=[] is invalid: give at least one tool, or tools=None for none.")
    names = []
    for number, tool in enumerate(tools or ()):
        function = tool.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if tool.get("type", "function") != "function" or not isinstance(name, str) or not name:
            raise ValueError(
                f"tools: tool {number} is invalid ({str(tool)[:80]}). Each tool must be {{'type': 'function', "
                "'function': {'name': ..., 'description': ..., 'parameters': {...}}}; vLLM runs function tools only."
            )
        names.append(name)
    if choice is None or choice == "none":
        return
    if tools is None:
        raise ValueError(f"tool_choice={choice!r} needs tools=[...]: vLLM refuses a tool choice without tools.")
    if isinstance(choice, Mapping):
        function = choice.get("function")
        wanted = function.get("name") if isinstance(function, Mapping) else None
        if choice.get("type", "function") != "function" or wanted not in names:
            raise ValueError(
                f"tool_choice={str(choice)[:80]} names no tool in tools ({', '.join(names)}). Use "
                "{'type': 'function', 'function': {'name': NAME}} with one of those names, or 'auto'/'required'."
            )


NAMES: tuple[str, ...] = tuple(GenerationParams.model_fields)

# The sampling parameters, sent under their own names (the rest are renamed, set by the client, or chat-only).
SAMPLING: tuple[str, ...] = (
    "frequency_penalty", "logit_bias", "presence_penalty", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "seed", "stop", "stop_token_ids", "include_stop_str_in_output", "min_tokens",
    "ignore_eos", "skip_special_tokens", "truncate_prompt_tokens", "truncation_side", "priority",
)


def parse_params(values: Mapping[str, Any]) -> GenerationParams:
    """Check a call's parameters; raise ``InvalidInputError`` naming each bad one, its value and the rule."""
    unknown = [name for name in values if name not in GenerationParams.model_fields]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, NAMES, n=1)
            instead = _INSTEAD.get(name) or (f"did you mean {close[0]!r}?" if close else None)
            hints.append(f"{name!r} ({instead})" if instead else repr(name))
        raise InvalidInputError(
            f"unknown generation parameter(s) {', '.join(hints)}. Known: {', '.join(NAMES)}. "
            "Pass other vLLM request fields in extra_body={...}."
        )
    params = GenerationParams(**values)
    extra = params.extra_body or {}
    moved = {name: extra[name] for name in SAMPLING if name in extra}
    if not moved:
        return params
    # A sampling parameter in extra_body is sent as it is: it gets the typed parameter's checks, as that parameter.
    twice = [name for name in moved if name in values]
    if twice:
        raise InvalidInputError(
            f"{', '.join(twice)} given twice, as a parameter and in extra_body; pass it once, as "
            f"{twice[0]}=..."
        )
    rest = {name: value for name, value in extra.items() if name not in moved}
    try:
        return GenerationParams(**{**values, **moved, "extra_body": rest or None})
    except InvalidInputError as exc:
        raise InvalidInputError(f"extra_body: {exc}") from None


# Names from the OpenAI API or vLLM that this client spells differently or sets itself.
_INSTEAD = {
    "n": "use num_generations=",
    "top_logprobs": "use logprobs=",
    "stream": "for one answer token by token use stream(...) or astream(...); aiter_generate(...) yields each "
    "input's result as it completes",
}


def _describe(exc: ValidationError, values: Mapping[str, Any]) -> str:
    problems: dict[str, str] = {}
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule across parameters: its message names them
            problems[""] = message
            continue
        name = str(error["loc"][0])
        if name in problems:  # a union reports once per member; the first says enough
            continue
        rule = GenerationParams.model_fields[name].description or ""
        got = values.get(name)
        problems[name] = f"{name}={_short(got)} is invalid ({message[:1].lower()}{message[1:]}). Expected: {rule}"
    return " ".join(problems.values())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def signature_defaults() -> list[tuple[str, Any, Any]]:
    """``(name, annotation, default)`` of every parameter, in declaration order (for ``agenerate``'s signature)."""
    return [(name, field.annotation, field.default) for name, field in GenerationParams.model_fields.items()]
