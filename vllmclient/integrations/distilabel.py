"""``ClientvLLM`` as a real distilabel ``LLM``, for tasks and pipelines (``pip install "pyvllmclient[distilabel]"``).

``TextGeneration(llm=ClientvLLM(...))``, ``MagpieGenerator``, ``UltraFeedback``, ...: distilabel validates,
serializes (``dump``/``from_dict``) and calls it as any of its own ``AsyncLLM`` s, and gets its own result
dicts back, while the work runs on vllmclient's engine: a batch is packed into few requests, the server's
load is bounded by ``max_concurrency``, and a failed input gets ``None`` generations (with a warning saying
why) instead of taking its whole batch down. The only module of vllmclient that imports distilabel.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

try:
    from distilabel.mixins.runtime_parameters import RuntimeParameter  # type: ignore[import-untyped]
    from distilabel.models.llms.base import AsyncLLM  # type: ignore[import-untyped]
    from distilabel.models.mixins.magpie import MagpieChatTemplateMixin  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"vllmclient.integrations.distilabel needs distilabel ({exc}): pip install 'pyvllmclient[distilabel]'"
    ) from exc
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Secret,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from .. import client as _core
from .._bulk import log_failures
from .._config import conceal
from .._settings import default_api_key
from ..errors import InvalidInputError
from ..results import GenerationError, failed_output
from ..structured import from_distilabel

if TYPE_CHECKING:
    from ..conversation import Conversation
    from ..results import GenerateOutput

__all__ = ["ClientvLLM"]

_NO_BATCH_API = "vLLM serves no OpenAI Batch API; a pipeline's cache already resumes where it stopped"


class ClientvLLM(AsyncLLM, MagpieChatTemplateMixin):  # type: ignore[misc]  # distilabel is untyped
    """A distilabel ``LLM`` for a vLLM server, run by vllmclient: same fields as ``vllmclient.ClientvLLM``.

    ``generate`` (what tasks call through ``generate_outputs``) sends the whole batch through vllmclient's
    bulk run; ``agenerate`` one conversation. Both return distilabel's ``GenerateOutput``:
    ``{"generations": [...], "statistics": {"input_tokens": [...], "output_tokens": [...]}}`` (one entry
    per generation) plus ``logprobs`` when asked for. Settings are checked by vllmclient's rules.
    """

    model_config = ConfigDict(hide_input_in_errors=True)  # the input holds api_key

    model: str | None = None
    base_url: RuntimeParameter[str | list[str]] = Field(
        default="http://localhost:8000",
        description="The base URL of the vLLM server, with or without /v1; or a list of servers of one model.",
    )
    api_key: RuntimeParameter[SecretStr] | None = Field(
        default_factory=default_api_key,
        description="The key the server was started with (--api-key); defaults to $VLLM_API_KEY. Never saved.",
    )
    max_retries: RuntimeParameter[int] = Field(
        default=6, description="How many times the SDK retries a failed request (connection errors, 429, 5xx)."
    )
    timeout: RuntimeParameter[float] = Field(
        default=120, description="Seconds the server may take to answer one request (queueing does not count)."
    )
    httpx_client_kwargs: RuntimeParameter[dict[str, Any]] | None = Field(
        default=None, description="Extra arguments for the HTTP client (verify, proxy, ...). Secrets are not saved."
    )
    default_headers: dict[str, str] | None = None
    tokenizer: str | None = None
    tokenizer_revision: str | None = None
    trust_remote_code: bool = False
    tokenizer_check: Literal["warn", "error", "off"] = "warn"
    max_concurrency: RuntimeParameter[int] = Field(
        default=256, description="The most sequences (prompts x num_generations) the server works on at once."
    )
    pack_size: int | None = None
    structured_output: RuntimeParameter[dict[str, Any]] | None = Field(
        default=None,
        description="{'schema': <pydantic model class or JSON schema>}: vLLM's constrained decoding for every call.",
    )

    _client: _core.ClientvLLM | None = PrivateAttr(default=None)
    _client_settings: dict[str, Any] | None = PrivateAttr(default=None)

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return _core.ClientvLLM._path_to_str(value)

    @model_validator(mode="after")
    def _check_settings(self) -> ClientvLLM:
        """vllmclient's checks, at construction and on every assignment (distilabel validates assignments)."""
        if self.use_offline_batch_generation:
            raise ValueError(f"use_offline_batch_generation=True is not supported: {_NO_BATCH_API}")
        _core.ClientvLLM(**self._settings(), generation_kwargs=self.generation_kwargs or {})
        return self

    @field_serializer("default_headers", "httpx_client_kwargs")
    def _drop_secrets(self, value: dict[str, Any] | None) -> Any:
        """Pipelines are saved to disk and hashed: auth headers, cookies and passwords are left out (as api_key is)."""
        return _without_secrets(conceal(value))

    @field_serializer("structured_output")
    def _schema_as_json(self, value: dict[str, Any] | None) -> Any:
        """A model class is saved as its JSON schema (dumps go to JSON/YAML files), as distilabel saves it."""
        if value is not None and isinstance(value.get("schema"), type) and issubclass(value["schema"], BaseModel):
            return {**value, "schema": value["schema"].model_json_schema()}
        return value

    def _settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SHARED_FIELDS}

    @property
    def client(self) -> _core.ClientvLLM:
        """The vllmclient client doing the work, rebuilt (it reconnects lazily) when a setting changed."""
        settings = self._settings()
        if self._client is None or settings != self._client_settings:  # compared as given: the core normalizes
            if self._client is not None:
                self._client.close()
            self._client = _core.ClientvLLM(**settings)
            self._client_settings = copy.deepcopy(settings)  # a header changed in place is a change too
        return self._client

    @property
    def model_name(self) -> str:
        """The served model's name: ``model``, or the one discovered by ``load()``."""
        return self._client.model_name if self._client is not None else (self.model or "")

    def load(self) -> None:
        """Connect (discover the model, load the tokenizer), then distilabel's own load (its logger)."""
        self.client.load()
        super().load()

    def unload(self) -> None:
        if self._client is not None:
            self._client.close()

    def generate(
        self, inputs: list[Any], num_generations: int = 1, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """Every input in one bulk run (packed, bounded); a failed input gets ``None`` generations.

        distilabel's structured inputs, ``(conversation, {"format": "json"|"regex", "schema": ...})``, run
        as one bulk run per distinct spec (``None``: the LLM's own ``structured_output``).
        """
        outputs: list[GenerateOutput | None] = [None] * len(inputs)
        groups: dict[str, tuple[dict[str, Any], list[int], list[Conversation]]] = {}
        for index, item in enumerate(inputs):
            conversation, spec = _split(item)
            try:
                params = _structured_params(spec)
            except ValueError as exc:
                error = InvalidInputError(f"input {index}: {exc}")
                outputs[index] = failed_output(num_generations, GenerationError.from_exception(index, error))
                continue
            key = json.dumps(params, sort_keys=True, default=lambda value: f"{value!r}@{id(value)}")
            _, indexes, conversations = groups.setdefault(key, (params, [], []))
            indexes.append(index)
            conversations.append(conversation)
        for params, indexes, conversations in groups.values():
            results = self.client.generate(conversations, num_generations, progress=False, **{**kwargs, **params})
            for index, output in zip(indexes, results, strict=True):
                if "error" in output:  # its index in the whole batch, for the warning below
                    output["error"] = dataclasses.replace(output["error"], index=index)
                outputs[index] = output
        done = [output for output in outputs if output is not None]
        log_failures(done, logging.WARNING, "their generations are None")
        return [_as_distilabel(output) for output in done]

    async def agenerate(
        self, input: Any, num_generations: int = 1, **kwargs: Any
    ) -> dict[str, Any]:
        """Generate for one conversation (or structured input); raises on failure. The parameters are
        ``vllmclient.GenerationParams``' fields."""
        conversation, spec = _split(input)
        try:
            params = _structured_params(spec)
        except ValueError as exc:
            raise InvalidInputError(f"input 0: {exc}") from None
        return _as_distilabel(await self.client.agenerate(conversation, num_generations, **{**kwargs, **params}))


# vllmclient's sampling parameters are agenerate's: distilabel lists them as generation_kwargs' keys.
ClientvLLM.agenerate.__signature__ = _core.ClientvLLM.agenerate.__signature__  # type: ignore[attr-defined]

_SHARED_FIELDS = [name for name in _core.ClientvLLM.model_fields if name in ClientvLLM.model_fields
                  and name != "generation_kwargs"]


def _split(item: Any) -> tuple[Any, Any]:
    """distilabel's ``StructuredInput`` is ``(conversation, structured_output)``; a conversation is a list of dicts."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], list):
        return item[0], item[1]
    return item, None


def _structured_params(spec: Any) -> dict[str, Any]:
    """A row's own structured output as vllmclient parameters; ``None``: the LLM's default applies."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping) and spec.get("format") == "regex":
        if not isinstance(spec.get("schema"), str):
            raise ValueError(f"structured_output {{'format': 'regex'}} needs the pattern as 'schema', got {spec!r}")
        return {"structured_outputs": {"regex": spec["schema"]}}
    schema, retries = from_distilabel(spec)
    return {"structured_outputs": schema} | ({} if retries is None else {"structured_outputs_retries": retries})


def _as_distilabel(output: GenerateOutput) -> dict[str, Any]:
    """distilabel's result dict: its tasks make a column of every other key, indexed per generation."""
    result: dict[str, Any] = {"generations": output["generations"], "statistics": dict(output["statistics"])}
    if "logprobs" in output:
        result["logprobs"] = output["logprobs"]
    return result


def _without_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_secrets(item) for key, item in value.items()
                if not isinstance(item, (SecretStr, Secret))}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_secrets(item) for item in value if not isinstance(item, (SecretStr, Secret)))
    return value

