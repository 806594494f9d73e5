"""What a ``ClientvLLM`` is configured with: distilabel's fields and defaults, each checked as it is set.

Kept apart from the client's behaviour (``client.py``: connecting, generating, streaming) so that the fields,
their validators and distilabel's runtime-parameter interface read as one thing. Every way of setting a
field (construction, ``model_validate*``, assignment, ``set_runtime_parameters``) raises
``ConfigurationError``, never pydantic's ``ValidationError``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, field_validator, model_validator

from ._config import check_base_url, check_headers, check_httpx_kwargs, conceal, mask_urls, reveal, setting_errors
from .errors import InvalidInputError
from .formatter import resolve_magpie_template
from .params import GenerationParams, parse_params
from .structured import from_distilabel, parse_spec

__all__ = ["Settings", "api_base", "default_api_key"]

logger = logging.getLogger("vllmclient")

_RUNTIME_PARAMETERS = {
    "base_url": "The base URL of the vLLM server, with or without the trailing /v1; or a list of servers of one model.",
    "api_key": "The API key the server was started with (--api-key); defaults to $VLLM_API_KEY.",
    "max_retries": "How many times the SDK retries a failed request (connection errors, 408/409/429/5xx).",
    "timeout": "Seconds the server may take to answer a request; one that takes longer fails and is not re-sent.",
    "httpx_client_kwargs": "Extra keyword arguments for the HTTP client the SDK uses (limits, verify, proxy, ...).",
    "max_concurrency": "The most sequences (prompts x num_generations) the server works on at once.",
    "structured_output": "distilabel's {'schema': <pydantic model class or JSON schema>, 'format': 'json'}: the "
    "default structured_outputs of every call.",
}
_DISTILABEL_ONLY = {
    "use_offline_batch_generation": (False, "vLLM serves no OpenAI Batch API; use generate(..., checkpoint=...)"),
    "offline_batch_generation_block_until_done": (None, "vLLM serves no OpenAI Batch API"),
    "jobs_ids": (None, "vLLM serves no OpenAI Batch API"),
}
_DEFAULT_API_KEY = "EMPTY"  # any non-empty string: the SDK refuses to start without a key


def default_api_key() -> SecretStr:
    return SecretStr(os.environ.get("VLLM_API_KEY") or _DEFAULT_API_KEY)


def api_base(base_url: str) -> str:
    """Accept both ``http://host:8000`` (distilabel's documented default) and ``http://host:8000/v1``."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class Settings(BaseModel):
    """``ClientvLLM``'s fields (see there), their checks and distilabel's runtime parameters."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, arbitrary_types_allowed=True, hide_input_in_errors=True
    )

    model: str | None = None
    base_url: str | list[str] = "http://localhost:8000"
    """The vLLM server's address, with or without the trailing ``/v1``; or a list of servers (replicas)
    serving the same model, each taking its share of ``max_concurrency`` (see "Several servers" in README)."""
    api_key: SecretStr = Field(default_factory=default_api_key)
    max_retries: int = Field(default=6, ge=0)
    """Retries by the SDK, with exponential back-off, of a request that could not connect, whose connection
    dropped, or that was answered 408/409/429/5xx. Not of one that outlasted ``timeout`` (see there), nor
    after a TLS certificate failed verification (it would fail again)."""
    timeout: float = Field(default=120, gt=0, allow_inf_nan=False)  # inf: OverflowError at load
    """Seconds the server may take to answer one request (a pack of prompts, or one chat), counted from the
    send: waiting for a free slot of ``max_concurrency`` does not count. A request that outlasts it fails
    with ``ServerTimeoutError`` and is sent once only, whatever ``max_retries``: vLLM aborts a generation
    whose client went away, so a re-send would start it over and most likely take as long again. Raise it
    for long generations. Also the limit for opening a connection."""
    httpx_client_kwargs: dict[str, Any] | None = None
    default_headers: dict[str, str] | None = None
    tokenizer: str | None = None
    tokenizer_revision: str | None = None
    trust_remote_code: bool = False
    use_magpie_template: bool = False
    magpie_pre_query_template: str | None = None
    tokenizer_check: Literal["warn", "error", "off"] = "warn"
    send_token_ids: bool = False
    """Render each conversation with the chat template, tokenize it on the client (as the server would:
    ``add_special_tokens`` off, the template's BOS the only one) and send the token ids; ``/v1/completions``
    takes them as they are, and the results are those of sending the text. The server's API process then
    tokenizes nothing (about a quarter less of its CPU per prompt, measured) and the local length check counts
    these ids; the client does the tokenizing instead. Off by default: on the real server it was not shown
    faster end to end (benchmarks/offline_limit.py; see README, Performance). Ignored with ``tokenizer=None``;
    inputs that are already token ids are sent as they are either way."""
    max_concurrency: int = Field(default=256, ge=1)
    pack_size: int | None = Field(default=None, ge=1, le=1024)
    """Most inputs per request; ``None`` adapts it to the server's speed. With ``tokenizer=None`` conversations
    are packed through vLLM's ``/v1/chat/completions/batch``, whose answer has no per-conversation input token
    count (``input_tokens`` is ``None``); ``pack_size=1`` sends one conversation per request, with the count."""
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    structured_output: dict[str, Any] | None = None

    # -- validation -------------------------------------------------------------------------------

    # Every way of setting a field (construction, model_validate*, assignment, set_runtime_parameters)
    # raises ConfigurationError, never pydantic's ValidationError; type checkers keep pydantic's signature.
    if not TYPE_CHECKING:

        def __init__(self, /, **data: Any) -> None:
            with setting_errors(type(self).model_fields):
                super().__init__(**data)

        @classmethod
        def model_validate(cls, *args: Any, **kwargs: Any) -> Self:
            with setting_errors(cls.model_fields):
                return super().model_validate(*args, **kwargs)

        @classmethod
        def model_validate_json(cls, *args: Any, **kwargs: Any) -> Self:
            with setting_errors(cls.model_fields):
                return super().model_validate_json(*args, **kwargs)

        @classmethod
        def model_validate_strings(cls, *args: Any, **kwargs: Any) -> Self:
            with setting_errors(cls.model_fields):
                return super().model_validate_strings(*args, **kwargs)

    @field_validator("base_url", mode="before")
    @classmethod
    def _check_base_url(cls, value: Any) -> Any:
        if isinstance(value, str):
            return check_base_url(value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(url, str) for url in value):
            raise ValueError(
                f"base_url={mask_urls(repr(value))[:120]} is not a server's address: pass one, e.g. "
                "base_url='http://localhost:8000/v1', or a list of servers serving the same model."
            )
        urls = [check_base_url(url) for url in value]
        if not urls:
            raise ValueError("base_url is an empty list: pass the server's address, or a list of replicas' addresses.")
        seen = [api_base(url) for url in urls]
        twice = sorted({url for url in seen if seen.count(url) > 1})
        if twice:
            raise ValueError(f"base_url lists {', '.join(twice)} more than once: list each server once.")
        return urls

    @field_validator("default_headers", "httpx_client_kwargs", mode="before")
    @classmethod
    def _reveal_secrets(cls, value: Any) -> Any:
        return reveal(value)  # as model_dump() hid them, so that its output round-trips

    @field_validator("httpx_client_kwargs")
    @classmethod
    def _check_httpx_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_httpx_kwargs(value)

    @field_validator("default_headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        check_headers(value, "default_headers")
        return value

    @field_validator("generation_kwargs")
    @classmethod
    def _check_generation_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        """A typo or a bad value fails here, not at the first generate call."""
        try:
            params = parse_params({name: item for name, item in value.items() if name != "num_generations"})
            parse_spec(params.structured_outputs)
        except InvalidInputError as exc:
            raise ValueError(f"generation_kwargs: {exc}") from None
        return value

    @field_serializer("default_headers", "httpx_client_kwargs")
    def _hide_secrets(self, value: dict[str, Any] | None) -> Any:
        """A header or auth value is shown as '**********' (kept intact by model_dump(), as for api_key)."""
        return conceal(value)

    @field_validator("model", mode="before")
    @classmethod
    def _empty_model_is_discovered(cls, value: Any) -> Any:
        return None if value == "" else value  # distilabel's default, found in saved configs

    @model_validator(mode="before")
    @classmethod
    def _accept_distilabel_defaults(cls, data: Any) -> Any:
        """Configs saved by distilabel carry fields that cannot work against vLLM: fine at their defaults."""
        if isinstance(data, dict):
            for name, (default, why) in _DISTILABEL_ONLY.items():
                if name in data:
                    if data[name] not in (default, None):
                        raise ValueError(f"{name}={data[name]!r} is not supported: {why}")
                    data = {k: v for k, v in data.items() if k != name}
        return data

    @field_validator("structured_output")
    @classmethod
    def _check_structured_output(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """distilabel's form (a schema) becomes every call's default ``structured_outputs``; other forms fail here."""
        if value is not None:
            from_distilabel(value)
        return value

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("magpie_pre_query_template")
    @classmethod
    def _resolve_magpie_alias(cls, value: str | None) -> str | None:
        return resolve_magpie_template(value)

    @field_validator("api_key", mode="before")
    @classmethod
    def _none_is_default_key(cls, value: Any) -> Any:
        return default_api_key() if value is None or value == "" else value

    @model_validator(mode="after")
    def _check_magpie(self) -> Self:
        if self.use_magpie_template and self.magpie_pre_query_template is None:
            raise ValueError(
                "use_magpie_template=True needs magpie_pre_query_template: 'llama3', 'qwen2' or the literal "
                "text that opens a user turn for this model"
            )
        return self

    # -- distilabel's runtime parameters ------------------------------------------------------------

    @property
    def runtime_parameters_names(self) -> dict[str, Any]:
        """Parameters settable after construction, name -> optional (as distilabel lists them)."""
        names: dict[str, Any] = dict.fromkeys(_RUNTIME_PARAMETERS, True)
        names["generation_kwargs"] = dict.fromkeys(GenerationParams.model_fields, True)
        return names

    def get_runtime_parameters_info(self) -> list[dict[str, Any]]:
        info: list[dict[str, Any]] = [
            {"name": name, "optional": True, "description": text} for name, text in _RUNTIME_PARAMETERS.items()
        ]
        info.append(
            {
                "name": "generation_kwargs",
                "description": "The kwargs passed to every generate call (the parameters of agenerate).",
                "keys": [
                    {"name": name, "optional": optional}
                    for name, optional in self.runtime_parameters_names["generation_kwargs"].items()
                ],
            }
        )
        return info

    def set_runtime_parameters(self, runtime_parameters: Mapping[str, Any]) -> None:
        """Set runtime parameters by name; as in distilabel, an unknown name is skipped with a warning.

        All are checked first: one ConfigurationError names every invalid one, and nothing is changed.
        """
        known = {name: value for name, value in runtime_parameters.items()
                 if name in _RUNTIME_PARAMETERS or name == "generation_kwargs"}
        for name in runtime_parameters:
            if name not in known:
                logger.warning(
                    "vllmclient: %r is not a runtime parameter of ClientvLLM (known: %s); ignored",
                    name, ", ".join([*_RUNTIME_PARAMETERS, "generation_kwargs"]),
                )
        self.model_validate({**dict(self), **known})
        for name, value in known.items():
            setattr(self, name, value)

    def __repr_args__(self) -> Any:  # keep keys, auth headers and URL passwords out of reprs and logs
        for name, value in super().__repr_args__():
            yield name, ("**********" if name == "api_key" else conceal(value))
