"""``ClientvLLM``: distilabel's client for a vLLM server, same fields and results, made robust and fast.

Orchestration only; data flows one way: inputs → ``formatter`` (validation, the chat template) →
``_request`` (the body, from the typed ``params``) → ``_engine`` (capacity, packs, isolation) →
``_responses`` (answers → results); ``_bulk`` runs a whole call (checkpoint, progress), ``_server`` reads
what the server serves, ``_sync`` is the event-loop plumbing.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import os
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, Self

import openai
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from ._bulk import check_bulk_arguments, collect, log_failures, run
from ._config import check_base_url, check_headers, check_httpx_kwargs, conceal, mask_urls, reveal, setting_errors
from ._engine import Engine, as_input_error
from ._http import http_client
from ._replicas import Replica, Replicas, discover_all, shares
from ._request import Request, build_request
from ._server import ServerInfo, check_tokenizer
from ._stream import StreamEvent, check_streamable, stream_events
from ._sync import LoopThread
from .checkpoint import Checkpoint
from .errors import ConfigurationError, InvalidInputError
from .formatter import ChatFormatter, Input, prepare_for, resolve_magpie_template
from .params import GenerationParams, parse_params
from .results import GenerateOutput
from .structured import from_distilabel, parse_spec

__all__ = ["ClientvLLM"]

logger = logging.getLogger("vllmclient")

# Changing one of these after load() means the SDK client (and, for the second set, the tokenizer) is rebuilt.
_CONNECTION_FIELDS = frozenset(
    {"base_url", "api_key", "max_retries", "timeout", "httpx_client_kwargs", "default_headers", "model",
     "max_concurrency", "pack_size", "tokenizer_check"}
)
_FORMATTER_FIELDS = frozenset(
    {"tokenizer", "tokenizer_revision", "trust_remote_code", "use_magpie_template", "magpie_pre_query_template"}
)
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


def _default_api_key() -> SecretStr:
    return SecretStr(os.environ.get("VLLM_API_KEY") or _DEFAULT_API_KEY)


def _api_base(base_url: str) -> str:
    """Accept both ``http://host:8000`` (distilabel's documented default) and ``http://host:8000/v1``."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class ClientvLLM(BaseModel):
    """A client for a vLLM server's OpenAI-compatible API, rendering prompts with the model's chat template.

    A drop-in for ``distilabel.models.llms.ClientvLLM``: same fields, defaults, methods and result
    shapes. On top: bounded concurrency with prompt packing, per-input error isolation, discovery of
    the served model, ``tokenizer=None`` for the server's own template, and sync calls that work in
    notebooks and inside running event loops.
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, arbitrary_types_allowed=True, hide_input_in_errors=True
    )

    model: str | None = None
    base_url: str | list[str] = "http://localhost:8000"
    """The vLLM server's address, with or without the trailing ``/v1``; or a list of servers (replicas)
    serving the same model, each taking its share of ``max_concurrency`` (see "Several servers" in README)."""
    api_key: SecretStr = Field(default_factory=_default_api_key)
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

    _aclient: openai.AsyncOpenAI | None = PrivateAttr(default=None)  # the first server's
    _tokenizer: Any = PrivateAttr(default=None)
    _formatter: ChatFormatter | None = PrivateAttr(default=None)
    _engine: Engine | None = PrivateAttr(default=None)
    _model_name: str | None = PrivateAttr(default=None)
    _server: ServerInfo | None = PrivateAttr(default=None)
    _loop: LoopThread = PrivateAttr(default_factory=LoopThread)
    _loading: asyncio.Task[None] | None = PrivateAttr(default=None)

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
        seen = [_api_base(url) for url in urls]
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
        return _default_api_key() if value is None or value == "" else value

    @model_validator(mode="after")
    def _check_magpie(self) -> ClientvLLM:
        if self.use_magpie_template and self.magpie_pre_query_template is None:
            raise ValueError(
                "use_magpie_template=True needs magpie_pre_query_template: 'llama3', 'qwen2' or the literal "
                "text that opens a user turn for this model"
            )
        return self

    def model_post_init(self, context: Any, /) -> None:
        # A client dropped without close() still closes its connections and stops its thread.
        weakref.finalize(self, self._loop.stop)

    def __setattr__(self, name: str, value: Any) -> None:
        with setting_errors(type(self).model_fields):
            super().__setattr__(name, value)
        if name in _FORMATTER_FIELDS:
            self._formatter = self._tokenizer = None
        if name in _CONNECTION_FIELDS or name in _FORMATTER_FIELDS:
            self._loading = None  # a load under way uses the old settings
            if self._engine is not None:
                self.close()  # rebuilt by the next load() or call

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

    # -- life cycle --------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The served model's name (discovered by ``load()`` unless ``model`` is set)."""
        return self._model_name or self.model or ""

    @property
    def max_model_len(self) -> int | None:
        """The model's context length as the server reports it, known after ``load()``."""
        return self._server.max_model_len(self.model_name) if self._server is not None else None

    def load(self) -> None:
        """Connect: build the SDK client, load the tokenizer, discover the model. Safe to call again."""
        if self._engine is None:
            self._loop.run(self._setup())

    async def aload(self) -> None:
        if self._engine is None:
            await self._loop.arun(self._setup())

    async def _setup(self) -> None:
        """Runs on the private loop; concurrent first calls share one loading task."""
        if self._engine is not None:
            return
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._connect())
        loading = self._loading
        try:
            await asyncio.shield(loading)
        finally:
            if loading.done():
                self._loading = None

    async def _connect(self) -> None:
        if self.tokenizer is None and self.use_magpie_template:
            raise ConfigurationError(
                "Magpie needs the raw prompt, which only a client-side chat template gives: pass tokenizer=..."
            )
        if self.tokenizer is not None and self._formatter is None:
            self._formatter = ChatFormatter.from_pretrained(
                self.tokenizer,
                revision=self.tokenizer_revision,
                trust_remote_code=self.trust_remote_code,
                magpie_pre_query_template=self.magpie_pre_query_template if self.use_magpie_template else None,
            )
            self._tokenizer = self._formatter.tokenizer
        urls = [self.base_url] if isinstance(self.base_url, str) else self.base_url
        replicas: list[Replica] = []
        router: Replicas | None = None
        try:
            for url, share in zip(urls, shares(self.max_concurrency, len(urls)), strict=True):
                replicas.append(self._replica(_api_base(url), share, len(urls)))
            router = Replicas(replicas, timeout=self.timeout)
            engine = Engine(router, pack_size=self.pack_size)
            server, name = await discover_all(router, self.model)
            if self._formatter is not None and self.tokenizer_check != "off":
                await check_tokenizer(engine, server, name, self._formatter, str(self.tokenizer), self.tokenizer_check)
        except BaseException:
            if router is not None:
                router.stop()
            for replica in replicas:
                await replica.aclient.close()
            raise
        for replica in replicas:
            self._loop.add_closer(replica.aclient.close)
        self._aclient, self._engine, self._server = replicas[0].aclient, engine, server
        self._model_name = name
        logger.info("vllmclient: using model %r at %s (max_model_len=%s)", name,
                    ", ".join(replica.base_url for replica in replicas), server.max_model_len(name))

    def _replica(self, api_base: str, share: int, replicas: int) -> Replica:
        """One server's SDK client, with its share of the connection budget and of ``max_concurrency``."""
        try:
            transport = http_client(self.httpx_client_kwargs, replicas=replicas)
        except (TypeError, ValueError, OSError) as exc:  # e.g. verify= a CA file that does not exist
            raise ConfigurationError(
                f"httpx_client_kwargs={mask_urls(repr(conceal(self.httpx_client_kwargs)))} cannot build the "
                f"HTTP client ({exc.__class__.__name__}: {mask_urls(str(exc))}). Fix or remove that argument."
            ) from None
        aclient = openai.AsyncOpenAI(
            base_url=api_base,
            api_key=self.api_key.get_secret_value(),
            max_retries=self.max_retries,
            timeout=self.timeout,
            default_headers=self.default_headers,
            http_client=transport,
        )
        return Replica(aclient, transport, base_url=api_base, connections=transport.connections, share=share)

    def close(self) -> None:
        """Release connections and the private loop's thread; ``load()`` (or any call) reconnects."""
        self._aclient = self._engine = None
        self._loop.stop()  # closes the SDK client

    unload = close  # distilabel's name

    async def aclose(self) -> None:
        self._aclient = self._engine = None
        await asyncio.get_running_loop().run_in_executor(None, self._loop.stop)

    def __enter__(self) -> Self:
        self.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await self.aload()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- generation --------------------------------------------------------------------------------

    async def agenerate(self, input: Input, num_generations: int = 1, **params: Any) -> GenerateOutput:
        """Generate ``num_generations`` completions for one conversation; raises on failure.

        ``input`` is a conversation (a list of ``{"role": ..., "content": ...}`` dicts, distilabel's format) or,
        with a client-side ``tokenizer``, a prompt already rendered and tokenized: a list of token ids (ints),
        sent as it is (checked against the tokenizer's vocabulary and the context length). The same holds for
        every input of ``generate``, ``generate_outputs``, ``aiter_generate`` and ``stream``.

        ``params`` are the fields of ``vllmclient.GenerationParams`` (``max_new_tokens=128``,
        ``temperature=1.0``, ``top_p=1.0``, vLLM's sampling parameters, ``structured_outputs``, ``tools``,
        ``model``, ``priority``, ``extra_body``, ...; see its docs): checked before anything is sent.
        vLLM parameters left as ``None`` are not sent, so the model's generation config applies.
        """
        return await self._loop.arun(self._agenerate_one(input, {"num_generations": num_generations, **params}))

    async def _agenerate_one(self, conversation: Input, params: dict[str, Any]) -> GenerateOutput:
        await self._setup()
        assert self._engine is not None
        request = self._request(params)
        return await self._engine.one(self._prepare_one(conversation, request), request)

    def _prepare_one(self, conversation: Input, request: Request) -> Any:
        try:
            return prepare_for(self._formatter, request, send_token_ids=self.send_token_ids)(0, conversation)
        except Exception as exc:
            error = as_input_error(0, exc)  # ours, as in a bulk call
            if error is exc:
                raise
            raise error from exc

    def astream(self, input: Input, **params: Any) -> AsyncIterator[StreamEvent]:
        """Generate for one conversation, yielding the answer as it is written: ``TextDelta`` events, then
        one ``StreamEnd`` (finish reason, token counts, time to first token, latency, request id).

        ``params`` are ``agenerate``'s (over the client's ``generation_kwargs``), checked before sending; one
        generation per stream. Leaving the loop early (``break``) closes the connection, and vLLM aborts the
        request; until then the stream holds its share of ``max_concurrency``. ``timeout`` bounds the wait for
        each piece (the first included), not the whole stream. Errors, including one the server reports
        mid-stream, are raised as ``vllmclient.errors``.
        """
        return self._loop.aiter(self._stream_one(input, params))

    def stream(self, input: Input, **params: Any) -> Iterator[StreamEvent]:
        """``astream`` for synchronous code: scripts, notebook cells, even code run inside an event loop."""
        return self._loop.iterate(self._stream_one(input, params))

    async def _stream_one(self, conversation: Input, params: dict[str, Any]) -> AsyncGenerator[StreamEvent]:
        """Runs on the private loop."""
        await self._setup()
        assert self._engine is not None
        defaults = {name: value for name, value in self.generation_kwargs.items() if name != "num_generations"}
        request = self._request({**defaults, **params})
        check_streamable(request)
        events = stream_events(self._engine, request, self._prepare_one(conversation, request))
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    def generate(
        self,
        inputs: Iterable[Input],
        num_generations: int = 1,
        *,
        strict: bool = False,
        progress: bool | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> list[GenerateOutput]:
        """Generate for every input; results in input order, one ``GenerateOutput`` each.

        An input that fails gets ``None`` generations and an ``"error"`` record; the others are
        unaffected. With ``strict=True`` a ``GenerationFailedError`` listing the failures is raised at
        the end instead (its ``results`` keep every output). ``progress`` shows a bar (default: for
        100 inputs or more, and for iterables of unknown length). ``checkpoint`` names a file that
        saves each result as it completes, so the same call after Ctrl-C or a crash sends only what is
        missing. ``kwargs`` are ``agenerate``'s sampling parameters.
        """
        if strict not in (True, False):
            raise InvalidInputError(f"strict={strict!r} is invalid: expected True or False.")
        stream = self._stream(inputs, num_generations, progress, checkpoint, kwargs, keep_saved=True)
        outputs = self._loop.run(collect(stream, strict=strict))
        log_failures(outputs, logging.DEBUG, "each one's output holds its 'error' record")
        return outputs

    def generate_outputs(
        self,
        inputs: Iterable[Input],
        num_generations: int = 1,
        *,
        strict: bool = False,
        progress: bool | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> list[list[str | None]]:
        """Like ``generate``, returning only the texts: one list of ``num_generations`` per input.

        A failed input's texts are ``None``; a warning says how many failed and why (``generate`` returns
        each failure's record, ``strict=True`` raises).
        """
        outputs = self.generate(
            inputs, num_generations, strict=strict, progress=progress, checkpoint=checkpoint, **kwargs
        )
        log_failures(outputs, logging.WARNING, "their generations are None (generate() returns each failure's "
                      "record; strict=True raises instead)")
        return [output["generations"] for output in outputs]

    async def aiter_generate(
        self,
        inputs: Iterable[Input],
        num_generations: int = 1,
        *,
        progress: bool | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[tuple[int, GenerateOutput]]:
        """Yield ``(index, output)`` as each input completes, for jobs too large to hold in memory.

        Inputs are read lazily (a generator reading a file is fine) and only as fast as results are
        consumed. Failed inputs are yielded with an ``"error"`` record, never raised. With
        ``checkpoint``, results saved by an earlier run are skipped, not yielded again.
        """
        stream = self._stream(inputs, num_generations, progress, checkpoint, kwargs)
        async for batch in self._loop.aiter(stream):
            for item in batch:
                yield item

    async def _stream(
        self,
        inputs: Iterable[Input],
        num_generations: int,
        progress: bool | None,
        checkpoint: str | os.PathLike[str] | None,
        kwargs: dict[str, Any],
        *,
        keep_saved: bool = False,
    ) -> AsyncGenerator[list[tuple[int, GenerateOutput]]]:
        """Runs on the private loop: batches of ``(index, output)`` as packs complete (see ``_bulk.run``)."""
        check_bulk_arguments(inputs, progress)
        await self._setup()
        assert self._engine is not None
        request = self._request({**self.generation_kwargs, **kwargs, "num_generations": num_generations})
        job = None
        if checkpoint is not None:
            magpie = self.magpie_pre_query_template if self.use_magpie_template else None
            job = Checkpoint(checkpoint, request=request.body, tokenizer=self.tokenizer,
                             tokenizer_revision=self.tokenizer_revision, magpie_pre_query_template=magpie,
                             chat_template_kwargs=request.chat_template_kwargs, keep_outputs=keep_saved)
        prepare = prepare_for(self._formatter, request, send_token_ids=self.send_token_ids)
        batches = run(self._engine, request, prepare, inputs, progress=progress, checkpoint=job)
        try:
            async for batch in batches:
                yield batch
        finally:
            await batches.aclose()

    def _request(self, params: dict[str, Any]) -> Request:
        num_generations = params.pop("num_generations", 1)
        if self.structured_output is not None:  # a call's own structured_outputs (even None) wins
            params.setdefault("structured_outputs", self.structured_output["schema"])
            if self.structured_output.get("max_retries") is not None:
                params.setdefault("structured_outputs_retries", self.structured_output["max_retries"])
        assert self._server is not None
        return build_request(
            parse_params(params),
            num_generations=num_generations,
            chat=self._formatter is None,
            server=self._server,
            model=self.model_name,
        )

    def __getstate__(self) -> dict[Any, Any]:
        """Pickle the configuration only (for multiprocessing): connections and threads are per process."""
        state = super().__getstate__()
        state["__pydantic_private__"] = None
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self.model_post_init(None)  # fresh private state; load() reconnects

    def __copy__(self) -> Self:
        return self._clone(self.__getstate__())

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        return self._clone(copy.deepcopy(self.__getstate__(), memo))

    def _clone(self, state: dict[Any, Any]) -> Self:
        """A copy shares nothing at run time (connections, thread, loop): it connects on its own."""
        clone = self.__class__.__new__(self.__class__)
        clone.__setstate__(state)
        return clone

    def __repr_args__(self) -> Any:  # keep keys, auth headers and URL passwords out of reprs and logs
        for name, value in super().__repr_args__():
            yield name, ("**********" if name == "api_key" else conceal(value))


def _agenerate_signature() -> inspect.Signature:
    """``agenerate(self, input, num_generations=1, *, <every GenerationParams field>)``: for ``help()``,
    notebooks' completion and distilabel's runtime-parameter info."""
    kind = inspect.Parameter.KEYWORD_ONLY
    fields = [
        inspect.Parameter(name, kind, default=field.default, annotation=field.annotation)
        for name, field in GenerationParams.model_fields.items()
    ]
    head = list(inspect.signature(ClientvLLM.agenerate).parameters.values())[:3]
    return inspect.Signature([*head, *fields], return_annotation=GenerateOutput)


ClientvLLM.agenerate.__signature__ = _agenerate_signature()  # type: ignore[attr-defined]
