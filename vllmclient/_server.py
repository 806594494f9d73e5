"""What the server serves: model discovery and context length, from ``GET /v1/models``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError, ModelNotFoundError


@dataclass(frozen=True)
class ModelCard:
    id: str
    parent: str | None
    max_model_len: int | None


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


def choose_model(cards: list[ModelCard], wanted: str | None, base_url: str) -> tuple[str, int | None]:
    """The model to use and its context length.

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
    max_len = card.max_model_len
    if max_len is None and card.parent in by_id:
        max_len = by_id[card.parent].max_model_len
    return card.id, max_len
