"""Conversation → raw prompt, with the model's own Hugging Face chat template.

Rendering on the client (rather than letting the server do it through /v1/chat/completions) is what
makes Magpie possible: the prompt can end anywhere, e.g. on an open user turn.
"""

from __future__ import annotations

import difflib
import json
import logging
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, InvalidInputError, PromptTooLongError
from .params import plain_int

if TYPE_CHECKING:
    from ._request import Request

__all__ = [
    "MAGPIE_PRE_QUERY_TEMPLATES",
    "ChatFormatter",
    "Conversation",
    "Input",
    "Message",
    "TokenIds",
    "as_conversation",
    "validate_conversation",
]

logger = logging.getLogger("vllmclient")

Message = Mapping[str, Any]
Conversation = Sequence[Message]
TokenIds = Sequence[int]
Input = Conversation | TokenIds
"""What a generate call takes per input: a conversation (distilabel's chat format, a list of message dicts),
or a prompt already rendered and tokenized as a list of token ids (ints; an array of them too). The two
cannot be mistaken for one another; token ids are sent as they are to /v1/completions (client template only)."""

KNOWN_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "ipython", "function"})

MAGPIE_PRE_QUERY_TEMPLATES = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>user\n",
}


def validate_conversation(conversation: Any, index: int = 0, *, allow_empty: bool = False) -> Conversation:
    """The conversation as it is sent (see ``as_conversation``), or InvalidInputError naming the input and
    message at fault, what is wrong and the fix."""
    where = f"input {index}"
    given = conversation
    conversation = as_conversation(conversation)
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise InvalidInputError(
            f"{where}: expected a conversation (a list of {{'role': ..., 'content': ...}} dicts), "
            f"got {_type_name(given)}.{_conversation_fix(given)}"
        )
    if not conversation and not allow_empty:
        raise InvalidInputError(
            f"{where}: the conversation is empty. Give at least one message, or enable Magpie "
            "(use_magpie_template=True) to generate from an empty conversation."
        )
    for position, message in enumerate(conversation):
        if type(message) is dict and type(message.get("content")) is str:  # the usual case, checked cheaply
            role = message.get("role")
            if type(role) is str and role in KNOWN_ROLES:
                continue
        _check_message(message, f"{where}, message {position}")
    return conversation


def as_conversation(value: Any) -> Any:
    """The list of dicts a conversation stands for; anything that is no conversation comes back as it is.

    Any sequence of mappings is a conversation, and so is an array of them (anything with ``.tolist()``):
    Ray Data and pandas hand a ``list<struct>`` cell over as a numpy array of dicts, its nested lists
    (content parts, tool calls) as arrays too, and each message and part with every field of the column,
    ``None`` where it had none: those fields are dropped. What needs converting comes back new (the
    caller's objects are not changed); a list of dicts comes back as it is.
    """
    from_array = _is_array(value)
    if from_array:
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return value
    converted: list[Any] | None = None
    for position, message in enumerate(value):
        plain = message
        if from_array or type(message) is not dict or type(message.get("content")) is not str:
            plain = _plain_message(message, from_array)
        if plain is not message and converted is None:
            converted = list(value[:position])
        if converted is not None:
            converted.append(plain)
    return value if converted is None else converted


def _is_array(value: Any) -> bool:
    """An array (numpy, pandas, pyarrow) to be read as the list it holds; a str (numpy.str_ too) is not one."""
    return not isinstance(value, (str, bytes, Sequence, Mapping)) and callable(getattr(value, "tolist", None))


def _plain_message(message: Any, from_array: bool) -> Any:
    """A mapping as a dict, its arrays as lists and the mappings in them as dicts: what the SDK and templates
    take. From an array, without the ``None`` fields Arrow adds (a ``None`` role or content stays, to be
    refused or, for an assistant, kept)."""
    if not isinstance(message, Mapping):
        return message
    plain: dict[str, Any] = {}
    changed = type(message) is not dict
    for key, value in message.items():
        if value is None and from_array and key not in ("role", "content"):
            changed = True
            continue
        if _is_array(value):
            value, changed = value.tolist(), True
        if isinstance(value, list) and any(isinstance(item, Mapping) and (from_array or type(item) is not dict)
                                           for item in value):
            value, changed = [_plain_part(item, from_array) for item in value], True
        plain[key] = value
    return plain if changed else message


def _plain_part(part: Any, from_array: bool) -> Any:
    if not isinstance(part, Mapping):
        return part
    return {key: value for key, value in part.items() if value is not None or not from_array or key == "type"}


def _check_message(message: Any, at: str) -> None:
    if not isinstance(message, Mapping):
        raise InvalidInputError(
            f"{at}: expected a dict with 'role' and 'content', got {_type_name(message)}.{_message_fix(message)}"
        )
    role = message.get("role", _MISSING)
    if not isinstance(role, str) or role not in KNOWN_ROLES:
        if role is _MISSING:
            raise InvalidInputError(f"{at}: the message has no 'role'; add one of {_ROLES} (e.g. 'user').")
        close = difflib.get_close_matches(role.lower(), KNOWN_ROLES, n=1) if isinstance(role, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidInputError(f"{at}: unknown role {_short(role)}{hint}; use one of {_ROLES}.")
    content = message.get("content", _MISSING)
    if content is _MISSING and role != "assistant":
        raise InvalidInputError(
            f"{at}: the message has no 'content'; add it, e.g. {{'role': {role!r}, 'content': text}}."
        )
    if isinstance(content, str) or (role == "assistant" and (content is None or content is _MISSING)):
        return
    if not isinstance(content, list):
        raise InvalidInputError(
            f"{at}: 'content' must be a str or a list of content parts, got {_type_name(content)}."
            f"{_content_fix(content)}"
        )
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not isinstance(kind, str) or (kind == "text" and not isinstance(part.get("text"), str)):
            raise InvalidInputError(
                f"{at}, content part {number}: expected an OpenAI content part such as "
                f"{{'type': 'text', 'text': '...'}}, got {_short(part)}."
            )


_ROLES = ", ".join(sorted(KNOWN_ROLES))
_MISSING: Any = object()


def _type_name(value: Any) -> str:
    if value is None:
        return "None"
    kind = type(value)
    package = kind.__module__.partition(".")[0]
    return kind.__qualname__ if package == "builtins" else f"{package}.{kind.__qualname__}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _conversation_fix(value: Any) -> str:
    if isinstance(value, (str, bytes)):
        return " Wrap a single prompt as [{'role': 'user', 'content': text}]."
    if isinstance(value, Mapping):
        return " This looks like a single message: put it in a list, [message]."
    if isinstance(value, Iterable):
        return " Pass the messages as a list, e.g. list(messages)."
    return ""


def _message_fix(value: Any) -> str:
    if isinstance(value, str):
        return f" Write it as {{'role': 'user', 'content': {_short(value)}}}."
    if isinstance(value, Sequence):
        return " The conversation holds a nested list: flatten it into one list of message dicts."
    if hasattr(value, "tolist"):
        return " Convert it with .tolist()."
    return ""


def _content_fix(value: Any) -> str:
    if value is None:
        return " Use '' for an empty message."
    if isinstance(value, (bytes, bytearray)):
        return " Decode it first, e.g. content.decode('utf-8')."
    if isinstance(value, Mapping):
        return " A single content part goes in a list: [part]."
    return " Convert it with str(...) if it is meant as text."


def json_fault(value: Any) -> str | None:
    """Why ``value`` cannot be sent as UTF-8 JSON (as the openai SDK sends it), or ``None`` if it can."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        return (
            f"it holds {bad!r}, a lone surrogate that cannot be sent as UTF-8 (typical of bytes decoded with "
            "errors='surrogateescape'). Decode the source with errors='replace', or clean the text"
        )
    except ValueError:
        return "it holds a NaN or an infinite number, which JSON cannot carry. Use finite numbers (or None)"
    except TypeError as exc:
        return f"{exc}. Use str, finite numbers, lists and dicts"
    return None


def join_text_parts(conversation: Conversation, index: int) -> Conversation:
    """Messages whose content is a list of parts, with the text parts joined by newlines.

    That is what vLLM does for a chat template that expects string content, so the client-side template
    sees what the server's would. Any other part (image, audio, video) needs the server's multimodal
    processor, so it fails this input with that advice. Conversations without parts come back as they are.
    """
    if all(isinstance(message.get("content"), str | None) for message in conversation):
        return conversation
    joined: list[Message] = []
    for position, message in enumerate(conversation):
        content = message.get("content")
        if isinstance(content, list):
            other = [part.get("type") for part in content if part.get("type") != "text"]
            if other:
                raise InvalidInputError(
                    f"input {index}, message {position}: a {other[0]!r} content part cannot be rendered by the "
                    "client-side chat template (text only). Create the client with tokenizer=None so that the "
                    "server's multimodal processor handles it (the model must be multimodal)."
                )
            message = {**message, "content": "\n".join(part["text"] for part in content)}
        joined.append(message)
    return joined


def check_encodable(conversation: Conversation, index: int) -> None:
    """Refuse a conversation that cannot be sent as UTF-8 JSON, naming the message and the fault.

    Checked on both paths, so a conversation is refused or accepted whichever renders it (a template
    would write a NaN in tool-call arguments into the prompt as invalid JSON).
    """
    try:
        json.dumps(conversation, ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, TypeError):
        raise unencodable(conversation, index) from None


def unencodable(conversation: Any, index: int) -> InvalidInputError:
    """The error for a conversation that cannot be sent as UTF-8 JSON, naming the message and the fault."""
    for position, message in enumerate(conversation):
        fault = json_fault(message)
        if fault is not None:
            return InvalidInputError(f"input {index}, message {position} cannot be sent: {fault}.")
    return InvalidInputError(f"input {index} cannot be sent as UTF-8 JSON.")


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

    An input is a token-id prompt when it is a non-empty sequence (or array) whose first item is an int:
    a conversation is a sequence of dicts, so the two cannot be mistaken for one another (an empty list
    stays an empty conversation). The ids are not checked here (see ``check_token_ids``).
    """
    if type(value) is list:
        if not value or type(value[0]) is dict:  # the usual conversation: decided at once
            return None
    elif _is_array(value):
        value = value.tolist()  # a numpy scalar gives a scalar: no token-id input
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    if not value or not isinstance(value[0], numbers.Integral) or isinstance(value[0], bool):
        return None
    return value if type(value) is list else list(value)


def check_token_ids(ids: list[Any], index: int, vocab_size: int | None) -> list[int]:
    """The ids as plain ints, or ``InvalidInputError`` naming the input, the position and the rule.

    vLLM takes ids from 0 to the vocabulary's largest; with the client's tokenizer known (``vocab_size``)
    the upper bound is checked here too, so one bad input never costs its pack a round trip.
    """
    if not all(type(token) is int for token in ids):
        ids = [plain_int(token) for token in ids]
        for position, token in enumerate(ids):
            if type(token) is not int:
                raise InvalidInputError(
                    f"input {index}: item {_short(token)} at position {position} of this token-id prompt is "
                    f"{_type_name(token)}, not an int token id. A token-id input holds ints only (a conversation "
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
