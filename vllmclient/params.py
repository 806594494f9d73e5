"""The generation parameters, described once: names, types, ranges and docs.

``GenerationParams`` is the one source of ``agenerate``'s signature, of distilabel's runtime-parameter
info (``generation_kwargs``) and of the request body (``_request.build_request``). Values are checked
strictly (no ``"0.7"`` → 0.7 coercion, no ``True`` for an int, no NaN or infinity) once per call, so a bad
value fails the call before anything is sent, never once per prompt at the server.

Names are vLLM's and the OpenAI API's, except distilabel's ``max_new_tokens`` (sent as ``max_tokens``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidInputError

__all__ = ["GenerationParams", "parse_params"]


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
    max_new_tokens: int = Field(128, ge=1, description="Most tokens to generate per generation (vLLM: max_tokens).")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="A number in [-2, 2].")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as str) -> bias added to its logit, each bias a finite number."
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="A number in [-2, 2].")
    temperature: float = Field(1.0, ge=0, description="A finite number >= 0; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="A number in (0, 1].")
    # -- vLLM's sampling ------------------------------------------------------------------------------
    top_k: int | None = Field(None, ge=-1, description="An int >= -1 (0 or -1 disables it).")
    min_p: float | None = Field(None, ge=0, le=1, description="A number in [0, 1].")
    repetition_penalty: float | None = Field(None, gt=0, description="A number > 0 (1 disables it).")
    seed: int | None = Field(None, description="An int: the same seed gives the same text.")
    stop: str | list[str] | None = Field(None, description="A str or a list of str that ends a generation.")
    stop_token_ids: list[int] | None = Field(None, description="A list of token ids that end a generation.")
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
        None, description="Scheduling priority (lower runs first); vLLM honours it only with --scheduling-policy "
        "priority, and ignores it otherwise.",
    )
    extra_body: dict[str, Any] | None = Field(
        None, description="Other vLLM request fields, sent as they are (unknown ones are warned about)."
    )

    @field_validator("logprobs", "prompt_logprobs", mode="before")
    @classmethod
    def _true_is_one(cls, value: Any) -> Any:
        return 1 if value is True else value

    @field_validator("stop", "stop_token_ids", "tools", mode="before")
    @classmethod
    def _tuple_is_list(cls, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _int_keys_are_str(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(key) if isinstance(key, int) and not isinstance(key, bool) else key: v for key, v in value.items()}
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("0 would keep no prompt at all; use -1 (as much as fits) or an int >= 1")
        return value


NAMES: tuple[str, ...] = tuple(GenerationParams.model_fields)


def parse_params(values: Mapping[str, Any]) -> GenerationParams:
    """Check a call's parameters; raise ``InvalidInputError`` naming each bad one, its value and the rule."""
    unknown = [name for name in values if name not in GenerationParams.model_fields]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, NAMES, n=1)
            hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        raise InvalidInputError(
            f"unknown generation parameter(s) {', '.join(hints)}. Known: {', '.join(NAMES)}. "
            "Pass other vLLM request fields in extra_body={...}."
        )
    return GenerationParams(**values)


def _describe(exc: ValidationError, values: Mapping[str, Any]) -> str:
    problems: dict[str, str] = {}
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        if name in problems:  # a union reports once per member; the first says enough
            continue
        rule = GenerationParams.model_fields[name].description or ""
        got = values.get(name)
        problems[name] = f"{name}={_short(got)} is invalid ({error['msg'].lower()}). Expected: {rule}"
    return " ".join(problems.values())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def signature_defaults() -> list[tuple[str, Any, Any]]:
    """``(name, annotation, default)`` of every parameter, in declaration order (for ``agenerate``'s signature)."""
    return [(name, field.annotation, field.default) for name, field in GenerationParams.model_fields.items()]
