"""``ClientvLLM``: distilabel's client for a vLLM server, same fields and results, made robust and fast.

Orchestration only; the fields and their checks are ``_settings``. Data flows one way: inputs →
``formatter`` (validation, the chat template) → ``_request`` (the body, from the typed ``params``) →
``_engine`` (capacity, packs, isolation; ``_replicas`` picks the server) → ``_responses`` (answers →
results); ``_bulk`` runs a whole call (checkpoint, progress), ``_server`` reads what the server serves,
``_sync`` is the event-loop plumbing.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import os
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from typing import Any, Self

import openai
from pydantic import PrivateAttr

from ._bulk import check_bulk_arguments, collect, log_failures, run
from ._config import conceal, mask_urls, setting_errors
from ._engine import Engine, as_input_error
from ._http import http_client
from ._replicas import Replica, Replicas, discover_all, shares
from ._request import Request, build_request
from ._server import ServerInfo, check_tokenizer
from ._settings import Settings, api_base
from ._stream import StreamEvent, check_streamable, stream_events
from ._sync import LoopThread
from .checkpoint import Checkpoint
from .errors import ConfigurationError, InvalidInputError
from .formatter import ChatFormatter, Input, prepare_for
from .params import GenerationParams, parse_params
from .results import GenerateOutput

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


class ClientvLLM(Settings):
    """A client for a vLLM server's OpenAI-compatible API, rendering prompts with the model's chat template.

    A drop-in for ``distilabel.models.llms.ClientvLLM``: same fields, defaults, methods and result
    shapes. On top: bounded concurrency with prompt packing, per-input error isolation, discovery of
    the served model, ``tokenizer=None`` for the server's own template, and sync calls that work in
    notebooks and inside running event loops.
    """

    _aclient: openai.AsyncOpenAI | None = PrivateAttr(default=None)  # the first server's
    _tokenizer: Any = PrivateAttr(default=None)
    _formatter: ChatFormatter | None = PrivateAttr(default=None)
    _engine: Engine | None = PrivateAttr(default=None)
    _model_name: str | None = PrivateAttr(default=None)
    _server: ServerInfo | None = PrivateAttr(default=None)
    _loop: LoopThread = PrivateAttr(default_factory=LoopThread)
    _loading: asyncio.Task[None] | None = PrivateAttr(default=None)

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
                replicas.append(self._replica(api_base(url), share, len(urls)))
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
