"""Conversation → raw prompt, with the model's own Hugging Face chat template; and each input made ready to send.

Rendering on the client (rather than letting the server do it through /v1/chat/completions) is what
makes Magpie possible: the prompt can end anywhere, e.g. on an open user turn. ``prepare_for`` turns each
input (a conversation, checked by ``conversation``, or token ids) into what the request carries: the
rendered prompt or its ids on the template path, the messages on the chat path, length checked locally.
"""

from __future__ import annotations

import logging
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .conversation import (
    Conversation,
    check_encodable,
    is_array,
    join_text_parts,
    short_repr,
    type_name,
    unencodable,
    validate_conversation,
)
from .errors import ConfigurationError, InvalidInputError, PromptTooLongError
from .params import plain_int

if TYPE_CHECKING:
    from ._request import Request

__all__ = ["MAGPIE_PRE_QUERY_TEMPLATES", "ChatFormatter", "Input", "TokenIds", "prepare_for"]

logger = logging.getLogger("vllmclient")

TokenIds = Sequence[int]
Input = Conversation | TokenIds
"""What a generate call takes per input: a conversation (distilabel's chat format, a list of message dicts),
or a prompt already rendered and tokenized as a list of token ids (ints; an array of them too). The two
cannot be mistaken for one another; token ids are sent as they are to /v1/completions (client template only)."""

MAGPIE_PRE_QUERY_TEMPLATES = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>user\n",
}


def _import_auto_tokenizer() -> Any:
    """Import transformers quietly: its "PyTorch was not found" advice is noise for a tokenizer-only use."""
    if "transformers" not in sys.modules:
        previous = os.environ.get(_NO_ADVICE)
        os.environ[_NO_ADVICE] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if previous is None:
                del os.environ[_NO_ADVICE]
            else:
                os.environ[_NO_ADVICE] = previous
    from transformers import AutoTokenizer

    return AutoTokenizer


_NO_ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def resolve_magpie_template(template: str | None) -> str | None:
    """Map the ``llama3`` / ``qwen2`` aliases to their pre-query strings; anything else is literal."""
    if template is None:
        return None
    return MAGPIE_PRE_QUERY_TEMPLATES.get(template, template)


class ChatFormatter:
    """Renders conversations with a tokenizer's chat template, and checks prompt lengths."""

    def __init__(self, tokenizer: Any, *, magpie_pre_query_template: str | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigurationError(
                f"The tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so "
                "conversations cannot be turned into prompts. Use an instruct/chat model's tokenizer, "
                "set tokenizer.chat_template, or pass tokenizer=None to let the server apply its template."
            )
        self.tokenizer = tokenizer
        self.magpie_pre_query_template = resolve_magpie_template(magpie_pre_query_template)
        self._bos = getattr(tokenizer, "bos_token", None) or ""
        self.vocab_size: int = len(tokenizer)  # ids 0 .. vocab_size - 1, the added special tokens included
        backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust core: skips a Python layer
        self._backend = backend if callable(getattr(backend, "encode", None)) else None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
        magpie_pre_query_template: str | None = None,
    ) -> ChatFormatter:
        """Load a tokenizer by Hugging Face repo id or local path (transformers is imported only here)."""
        AutoTokenizer = _import_auto_tokenizer()
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(name_or_path), revision=revision, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"Could not load the tokenizer {str(name_or_path)!r}"
                f"{f' at revision {revision!r}' if revision else ''}: {exc}. Check the repo id or path; "
                "offline, the files must be in the local Hugging Face cache or in that folder."
            ) from exc
        return cls(tokenizer, magpie_pre_query_template=magpie_pre_query_template)

    def render(self, conversation: Conversation, chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The raw prompt for /v1/completions: the chat template, then Magpie's pre-query if it applies.

        With Magpie on and a conversation that does not end on a user turn, the template is rendered
        without a generation prompt (an open assistant header followed by a user header would confuse
        the model), and the pre-query opens the next user turn; its BOS is dropped mid-conversation.
        """
        magpie = self.magpie_pre_query_template
        kwargs = chat_template_kwargs or {}
        if magpie is not None and (not conversation or conversation[-1]["role"] != "user"):
            if not conversation:
                return magpie
            prompt = self._apply(conversation, add_generation_prompt=False, **kwargs)
            if self._bos and magpie.startswith(self._bos) and prompt.startswith(self._bos):
                magpie = magpie[len(self._bos) :]
            return prompt + magpie
        return self._apply(conversation, add_generation_prompt=True, **kwargs)

    def _apply(self, conversation: Conversation, *, add_generation_prompt: bool, **kwargs: Any) -> str:
        prompt: str = self.tokenizer.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return prompt

    def count_tokens(self, prompt: str) -> int:
        """Token count of a rendered prompt as the server sees it (``add_special_tokens: false``)."""
        return len(self.encode(prompt))

    def encode(self, prompt: str) -> list[int]:
        """The token ids the server makes of a rendered prompt: ``add_special_tokens: false``, as the text path
        sends it (the template's own BOS is the only one)."""
        if self._backend is not None:
            ids: list[int] = self._backend.encode(prompt, add_special_tokens=False).ids
            return ids
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def check_prompt(
        self,
        prompt: str,
        conversation: Conversation,
        index: int,
        max_model_len: int | None,
        kept: Callable[[int], int] = int,
    ) -> None:
        """Fail, before sending, a prompt the server would refuse: one that is not valid UTF-8, or one that
        leaves no room in the context for a single output token (as vLLM counts: ``prompt < max_model_len``).

        ``kept`` maps the prompt's token count to what the server keeps of it (``truncate_prompt_tokens``).
        Cheap unless the prompt could be too long: a token covers at least one UTF-8 byte, so a prompt of
        fewer bytes than ``max_model_len`` less one is never tokenized here.
        """
        try:
            size = len(prompt.encode())
        except UnicodeEncodeError:
            raise unencodable(conversation, index) from None
        if max_model_len is None or size + 1 < max_model_len:
            return
        check_length(self.count_tokens(prompt), index, max_model_len, kept, "prompt")


def check_length(count: int, index: int, max_model_len: int | None, kept: Callable[[int], int], what: str) -> None:
    """Fail a prompt of ``count`` tokens that leaves no room in the context for one output token (as vLLM
    counts: what it keeps of the prompt must be below ``max_model_len``)."""
    if max_model_len is not None and kept(count) >= max_model_len:
        raise PromptTooLongError(
            f"input {index}: the {what} has {count} tokens but the model's maximum context length is "
            f"{max_model_len} tokens, and the server needs room for at least one output token. Shorten this "
            "input, pass truncate_prompt_tokens=..., or serve the model with a larger --max-model-len.",
            max_model_len=max_model_len,
            prompt_tokens=count,
        )


def token_ids(value: Any) -> list[Any] | None:
    """The token ids an input stands for, or ``None`` if it is no token-id input.

    An input is a token-id prompt when it is a non-empty sequence (or array) whose first item is a number:
    a conversation is a sequence of dicts, so the two cannot be mistaken for one another (an empty list
    stays an empty conversation). The ids are not checked here (see ``check_token_ids``: a bool or a float
    gets the token-id error, not a conversation's).
    """
    if type(value) is list:
        if not value or type(value[0]) is dict:  # the usual conversation: decided at once
            return None
    elif is_array(value):
        if getattr(getattr(value, "dtype", None), "kind", None) in ("b", "i", "u", "f") and value.ndim == 1:
            return list(value.tolist())  # a 1-d numeric array is token ids, even empty (check_token_ids refuses it)
        value = value.tolist()  # a numpy scalar gives a scalar: no token-id input
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    if not value or not isinstance(value[0], numbers.Number):
        return None
    return value if type(value) is list else list(value)


def check_token_ids(ids: list[Any], index: int, vocab_size: int | None) -> list[int]:
    """The ids as plain ints, or ``InvalidInputError`` naming the input, the position and the rule.

    vLLM takes ids from 0 to the vocabulary's largest; with the client's tokenizer known (``vocab_size``)
    the upper bound is checked here too, so one bad input never costs its pack a round trip.
    """
    if not ids:
        raise InvalidInputError(
            f"input {index}: the token-id prompt is empty. Give at least one token id (a conversation is a list "
            "of {'role': ..., 'content': ...} dicts)."
        )
    if not all(type(token) is int for token in ids):
        ids = [plain_int(token) for token in ids]
        for position, token in enumerate(ids):
            if type(token) is not int:
                raise InvalidInputError(
                    f"input {index}: item {short_repr(token)} at position {position} of this token-id prompt is "
                    f"{type_name(token)}, not an int token id. A token-id input holds ints only (a conversation "
                    "is a list of {'role': ..., 'content': ...} dicts)."
                )
    low, high = min(ids), max(ids)
    top = None if vocab_size is None else vocab_size - 1
    if low < 0 or (top is not None and high > top):
        position, token = next((p, t) for p, t in enumerate(ids) if t < 0 or (top is not None and t > top))
        bounds = f"0 to {top}" if top is not None else "0 or more"
        raise InvalidInputError(
            f"input {index}: token id {token} at position {position} is out of the vocabulary (ids {bounds}). "
            "Use ids made by this model's tokenizer."
        )
    return ids


def prepare_for(
    formatter: ChatFormatter | None, request: Request, *, send_token_ids: bool = False
) -> Callable[[int, Any], Any]:
    """The per-input step of a call: validate a conversation, then render its prompt and check it (client
    template), or pass its messages on (``formatter=None``: the server's template). Raises
    ``InvalidInputError`` / ``PromptTooLongError`` naming the input; runs once per input, so it stays lean.

    An input may also be a list of token ids (see ``token_ids``): checked (ints, in the vocabulary, room for
    output) and sent as it is. With ``send_token_ids``, each rendered prompt is tokenized here and its ids are
    sent: the server then tokenizes nothing, and the length check counts those ids (nothing is tokenized twice).
    """
    if formatter is None:

        def as_messages(index: int, conversation: Any) -> Any:
            if token_ids(conversation) is not None:
                raise InvalidInputError(
                    f"input {index} is a list of token ids, which only /v1/completions takes, and this client sends "
                    "conversations to /v1/chat/completions (tokenizer=None). Create the client with tokenizer=... "
                    "(the served model's) to send token ids."
                )
            conversation = validate_conversation(conversation, index)
            check_encodable(conversation, index)  # else it would fail at the SDK, for its whole pack
            return conversation

        return as_messages
    allow_empty = formatter.magpie_pre_query_template is not None
    template_kwargs, max_len, kept = request.chat_template_kwargs, request.max_model_len, request.prompt_budget
    vocab_size = formatter.vocab_size

    def as_prompt(index: int, conversation: Any) -> str | list[int]:
        ids = token_ids(conversation)
        if ids is not None:
            ids = check_token_ids(ids, index, vocab_size)
            check_length(len(ids), index, max_len, kept, "token-id prompt")
            return ids
        conversation = validate_conversation(conversation, index, allow_empty=allow_empty)
        if any(len(message) > 2 for message in conversation):  # tool calls, names: what templates may render
            check_encodable(conversation, index)  # (role and content reach the prompt: check_prompt sees them)
        conversation = join_text_parts(conversation, index)
        try:
            prompt = formatter.render(conversation, template_kwargs)
        except Exception as exc:  # templates raise anything (e.g. "roles must alternate")
            raise InvalidInputError(
                f"input {index}: the model's chat template rejected this conversation "
                f"({exc.__class__.__name__}: {exc}). Fix the conversation to fit the template."
            ) from exc
        if send_token_ids:
            try:
                prompt.encode()
            except UnicodeEncodeError:
                raise unencodable(conversation, index) from None
            ids = formatter.encode(prompt)
            check_length(len(ids), index, max_len, kept, "prompt")
            return ids
        formatter.check_prompt(prompt, conversation, index, max_len, kept)
        return prompt

    return as_prompt
