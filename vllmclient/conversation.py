"""A conversation as the client takes it: checked message by message, with errors that name the fault and the fix.

Shared by both paths (the client's chat template and the server's): a conversation is validated, its text parts
joined as vLLM joins them for string-content templates, and refused before sending when JSON cannot carry it.
"""

from __future__ import annotations

import difflib
import json
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import InvalidInputError

__all__ = [
    "KNOWN_ROLES",
    "Conversation",
    "Message",
    "as_conversation",
    "check_encodable",
    "join_text_parts",
    "json_fault",
    "unencodable",
    "validate_conversation",
]

Message = Mapping[str, Any]
Conversation = Sequence[Message]

KNOWN_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "ipython", "function"})

def validate_conversation(conversation: Any, index: int = 0, *, allow_empty: bool = False) -> Conversation:
    """The conversation as it is sent (see ``as_conversation``), or InvalidInputError naming the input and
    message at fault, what is wrong and the fix."""
    where = f"input {index}"
    given = conversation
    conversation = as_conversation(conversation)
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise InvalidInputError(
            f"{where}: expected a conversation (a list of {{'role': ..., 'content': ...}} dicts), "
            f"got {type_name(given)}.{_conversation_fix(given)}"
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
    from_array = is_array(value)
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


def is_array(value: Any) -> bool:
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
        if is_array(value):
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
            f"{at}: expected a dict with 'role' and 'content', got {type_name(message)}.{_message_fix(message)}"
        )
    role = message.get("role", _MISSING)
    if not isinstance(role, str) or role not in KNOWN_ROLES:
        if role is _MISSING:
            raise InvalidInputError(f"{at}: the message has no 'role'; add one of {_ROLES} (e.g. 'user').")
        close = difflib.get_close_matches(role.lower(), KNOWN_ROLES, n=1) if isinstance(role, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidInputError(f"{at}: unknown role {short_repr(role)}{hint}; use one of {_ROLES}.")
    content = message.get("content", _MISSING)
    if content is _MISSING and role != "assistant":
        raise InvalidInputError(
            f"{at}: the message has no 'content'; add it, e.g. {{'role': {role!r}, 'content': text}}."
        )
    if isinstance(content, str) or (role == "assistant" and (content is None or content is _MISSING)):
        return
    if not isinstance(content, list):
        raise InvalidInputError(
            f"{at}: 'content' must be a str or a list of content parts, got {type_name(content)}."
            f"{_content_fix(content)}"
        )
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not isinstance(kind, str) or (kind == "text" and not isinstance(part.get("text"), str)):
            raise InvalidInputError(
                f"{at}, content part {number}: expected an OpenAI content part such as "
                f"{{'type': 'text', 'text': '...'}}, got {short_repr(part)}."
            )


_ROLES = ", ".join(sorted(KNOWN_ROLES))
_MISSING: Any = object()


def type_name(value: Any) -> str:
    if value is None:
        return "None"
    kind = type(value)
    package = kind.__module__.partition(".")[0]
    return kind.__qualname__ if package == "builtins" else f"{package}.{kind.__qualname__}"


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _conversation_fix(value: Any) -> str:
    if isinstance(value, (str, bytes)):
        return " Wrap a single prompt as [{'role': 'user', 'content': text}]."
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return " A token-id prompt is one list of ints per input: generate([ids]) or stream(ids), not generate(ids)."
    if isinstance(value, Mapping):
        return " This looks like a single message: put it in a list, [message]."
    if isinstance(value, Iterable):
        return " Pass the messages as a list, e.g. list(messages)."
    return ""


def _message_fix(value: Any) -> str:
    if isinstance(value, str):
        return f" Write it as {{'role': 'user', 'content': {short_repr(value)}}}."
    items = value.tolist() if is_array(value) else value
    if isinstance(items, Sequence) and items and all(
        isinstance(item, numbers.Integral) and not isinstance(item, bool) for item in items
    ):
        return (" It holds ints: each token-id prompt is an input of its own, generate([ids1, ids2]), "
                "not generate([[ids1, ids2]]).")
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
