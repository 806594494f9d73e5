"""What the server serves: models and their context lengths (``GET /v1/models``) and its version
(``GET /version``), read once at ``load()``."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import APIError, ConfigurationError, ModelNotFoundError

if TYPE_CHECKING:
    from ._engine import Engine
    from ._replicas import Replica
    from .formatter import ChatFormatter

logger = logging.getLogger("vllmclient")


@dataclass(frozen=True)
class ModelCard:
    id: str
    parent: str | None
    max_model_len: int | None


@dataclass(frozen=True)
class ServerInfo:
    """The served models and the server's version, as ``load()`` found them."""

    base_url: str
    cards: list[ModelCard] = field(default_factory=list)
    version_text: str | None = None  # None: the server has no GET /version (not vLLM, or a proxy)

    @property
    def names(self) -> list[str]:
        return [card.id for card in self.cards]

    def card(self, name: str) -> ModelCard | None:
        return next((card for card in self.cards if card.id == name), None)

    def max_model_len(self, name: str) -> int | None:
        """The context length of a served model; a LoRA adapter inherits its base model's."""
        card = self.card(name)
        if card is None:
            return None
        if card.max_model_len is None and card.parent is not None:
            parent = self.card(card.parent)
            return parent.max_model_len if parent is not None else None
        return card.max_model_len

    @property
    def version(self) -> tuple[int, ...] | None:
        match = re.match(r"(\d+)\.(\d+)", self.version_text or "")
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def reads_guided_fields(self) -> bool:
        """Whether the server still reads the ``guided_*`` fields (removed in vLLM 0.12)."""
        version = self.version
        return version is not None and version < (0, 12)


# A user turn (every chat template takes one; many refuse a system turn) with digits, punctuation and
# non-ASCII text, so that both the template and the vocabulary show.
PROBE = [{"role": "user", "content": "Hello! Count 1, 2, 3; then say: café, naïve, 東京, ✓."}]


def tokenizer_mismatch(local: list[int], served: list[int], tokenizer: str, model: str) -> str | None:
    """Why the client's tokenizer cannot stand for the served model's, or ``None`` when they agree.

    Both token lists are of ``PROBE`` rendered with the chat template (the client's, and the one the
    server applies), so a different vocabulary and a different template both show.
    """
    if local == served:
        return None
    first = next((i for i, (a, b) in enumerate(zip(local, served, strict=False)) if a != b), min(len(local), len(served)))
    return (
        f"The tokenizer {tokenizer!r} does not match the served model {model!r}: a probe conversation renders and "
        f"tokenizes to {len(local)} tokens here and {len(served)} at the server (first difference at token "
        f"{first}). Prompts rendered with it would reach the model malformed. Pass the served model's tokenizer "
        "(the name or path given to `vllm serve`), or tokenizer_check='off' if the server's own template is the "
        "one that differs on purpose."
    )


def parse_version(payload: Any) -> str | None:
    version = payload.get("version") if isinstance(payload, dict) else None
    return version if isinstance(version, str) else None


def parse_models(payload: Any) -> list[ModelCard]:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ConfigurationError(
            f"GET /v1/models did not answer a model list (got {str(payload)[:200]!r}); "
            "is base_url a vLLM server?"
        )
    return [
        ModelCard(
            id=str(card["id"]),
            parent=card.get("parent"),
            max_model_len=card.get("max_model_len"),
        )
        for card in data
        if isinstance(card, dict) and "id" in card
    ]


def choose_model(cards: list[ModelCard], wanted: str | None, base_url: str) -> str:
    """The model to use.

    An explicit choice must be served. Otherwise the only card, or the one base model among LoRA
    adapters (vLLM lists adapters as cards with a parent); anything else is ambiguous.
    """
    names = [card.id for card in cards]
    by_id = {card.id: card for card in cards}
    if not cards:
        raise ConfigurationError(f"The server at {base_url} serves no models.")
    if wanted is not None:
        card = by_id.get(wanted)
        if card is None:
            raise ModelNotFoundError(
                f"The model {wanted!r} is not served at {base_url}. Served models: {', '.join(names)}.",
                served_models=names,
                status_code=404,
            )
    elif len(cards) == 1:
        card = cards[0]
    else:
        bases = [c for c in cards if not c.parent]
        if len(bases) != 1:
            raise ConfigurationError(
                f"The server at {base_url} serves several models ({', '.join(names)}); "
                "choose one with model=..."
            )
        card = bases[0]
    return card.id


async def discover(replica: Replica, api_base: str, wanted: str | None) -> tuple[ServerInfo, str]:
    """What ``load()`` reads from the server: its models (choosing one) and its version."""
    cards = parse_models(await replica.get("/models"))
    name = choose_model(cards, wanted, api_base)
    try:
        version = parse_version(await replica.get(api_base.removesuffix("/v1") + "/version"))
    except APIError:  # not vLLM, or a proxy that serves only /v1
        version = None
    server = ServerInfo(api_base, cards, version)
    return server, name


async def check_tokenizer(
    engine: Engine, server: ServerInfo, model: str, formatter: ChatFormatter, tokenizer: str, mode: str
) -> None:
    """Compare the client's rendering and tokenization of ``PROBE`` with the server's ``/tokenize``.

    A mismatch is a warning (``mode="error"``: a ``ConfigurationError``); a server without ``/tokenize``
    (or a chat template that refuses the probe) is not checked.
    """
    try:
        answer, *_ = await engine.post(
            server.base_url.removesuffix("/v1") + "/tokenize",
            {"model": model, "messages": PROBE, "add_generation_prompt": True},
            sequences=0,
        )
        served = answer["tokens"]
    except (APIError, KeyError, TypeError) as exc:
        logger.debug("vllmclient: tokenizer not checked (the server's /tokenize answered %s)", exc)
        return
    try:
        local = formatter.tokenizer.encode(formatter.render(PROBE), add_special_tokens=False)
    except Exception as exc:  # noqa: BLE001 - a template that refuses the probe is checked per input instead
        logger.debug("vllmclient: tokenizer not checked (the chat template refused the probe: %s)", exc)
        return
    problem = tokenizer_mismatch(list(local), list(served), tokenizer, model)
    if problem is None:
        return
    if mode == "error":
        raise ConfigurationError(problem)
    logger.warning("vllmclient: %s", problem)
