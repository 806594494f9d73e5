"""ClientvLLM's settings: the base_url check, hiding secrets, and pydantic's errors as ConfigurationError.

Every text the client produces about its settings (repr, model_dump, error messages) goes through
``conceal``, so a key in a header, an auth tuple or a password in a URL is never shown.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import ipaddress
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import Secret, SecretStr, ValidationError
from pydantic_core import ErrorDetails

from .errors import ConfigurationError

__all__ = ["check_base_url", "check_headers", "check_httpx_kwargs", "conceal", "mask_urls", "reveal", "setting_errors"]

# Header names and keyword arguments whose values are secrets (not "max_new_tokens" or "tokenizer").
_SECRET_NAME = re.compile(r"(?i)auth|passw|secret|cookie|credential|signature|api[-_]?key|(^|[-_])(key|token|cert)$")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)\S*@")  # to the last "@": a password may hold "/"
_LABEL = re.compile(r"(?i)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")  # "_": Docker Compose service names
_HEADER_NAME = re.compile(r"(?i)[!#$%&'*+.^_`|~0-9a-z-]+")  # RFC 9110 token
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")  # what httpx sends: ASCII, no line breaks
_ENDPOINTS = ("/chat/completions", "/completions", "/models")
_EXAMPLE = "'http://localhost:8000/v1'"
_SHOWN_CHARS = 120

# The fix for each field, added to pydantic's statement of the rule.
_EXPECTED = {
    "model": "Pass the served model's name, or None to use the one the server serves (model=None).",
    "base_url": f"Pass the vLLM server's address, e.g. base_url={_EXAMPLE}.",
    "api_key": "Pass the key the server was started with as a string, or set VLLM_API_KEY.",
    "max_retries": "Pass how often the SDK retries a failed request: an integer >= 0 (default max_retries=6).",
    "timeout": "Pass the seconds each request may take: a number > 0 (default timeout=120; long jobs: e.g. 3600).",
    "httpx_client_kwargs": "Pass a dict of httpx AsyncClient arguments, e.g. httpx_client_kwargs={'verify': False}.",
    "default_headers": "Pass a dict of header names to string values, e.g. default_headers={'X-Team': 'a'}.",
    "tokenizer": "Pass a Hugging Face model id or a local folder, or None for the server's chat template.",
    "tokenizer_revision": "Pass a branch, tag or commit of the tokenizer's repository, or None.",
    "trust_remote_code": "Pass True or False.",
    "use_magpie_template": "Pass True or False.",
    "magpie_pre_query_template": "Pass 'llama3', 'qwen2' or the literal text that opens a user turn.",
    "tokenizer_check": "Pass 'warn' (the default), 'error' or 'off'.",
    "max_concurrency": "Pass the most sequences in flight: an integer >= 1 (default max_concurrency=256).",
    "pack_size": "Pass pack_size=None (adaptive, the default) or the prompts per request, 1 to 1024.",
    "generation_kwargs": "Pass a dict of agenerate's parameters, e.g. generation_kwargs={'max_new_tokens': 256}.",
}


# -- secrets ---------------------------------------------------------------------------------------


def conceal(value: Any, name: object = None) -> Any:
    """``value`` with each secret wrapped in ``SecretStr``/``Secret``: shown as ``'**********'``, kept intact.

    A secret is a value under a secret-looking name (``Authorization``, ``auth``, ``X-Api-Key``, ...) or
    a URL holding a user or password. ``reveal`` undoes it, so a ``model_dump()`` round-trips.
    """
    if isinstance(value, (SecretStr, Secret)) or value is None:
        return value
    if isinstance(name, str) and _SECRET_NAME.search(name):
        return SecretStr(value) if isinstance(value, str) else Secret(value)
    if isinstance(value, Mapping):
        return {key: conceal(item, key) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(conceal(item) for item in value)
    if isinstance(value, str) and _USERINFO.search(value):
        return SecretStr(value)
    return value


def reveal(value: Any) -> Any:
    """Undo ``conceal`` (and accept secrets the user wrapped himself); other objects are left as they are."""
    if isinstance(value, (SecretStr, Secret)):
        return value.get_secret_value()
    if type(value) is dict:
        return {key: reveal(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(reveal(item) for item in value)
    return value


def mask_urls(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced by ``****``."""
    return _USERINFO.sub(r"\1****@", text)


def _shown(value: Any, name: object = None) -> str:
    text = mask_urls(repr(conceal(value, name)))
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


# -- base_url --------------------------------------------------------------------------------------


def check_base_url(value: str) -> str:
    """The URL with surrounding whitespace removed, or a ValueError saying what is wrong and the fix.

    Everything checked here would otherwise fail only at the first request, as a connection error or
    timeout after the SDK's retries (a space in the host), or as a raw error on every call (a password).
    """
    url = value.strip()
    if "@" in url:  # first, so that no other message shows the password
        without = _USERINFO.sub(r"\1", url) if "://" in url else "http://" + url.rpartition("@")[2]
        masked = mask_urls(url) if "://" in url else "****@" + url.rpartition("@")[2]
        raise ValueError(
            f"base_url {masked!r} holds a user name or password, which vLLM does not read (it checks "
            "'Authorization: Bearer <key>'): pass the key as api_key='...' or set VLLM_API_KEY, with "
            f"base_url={without!r}. A proxy in front that wants HTTP Basic auth: "
            "httpx_client_kwargs={'auth': (user, password)}."
        )
    shown = repr(url)
    if not url:
        raise ValueError(f"base_url is empty: pass the vLLM server's address, e.g. base_url={_EXAMPLE}.")
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in url):
        raise ValueError(f"base_url {shown} contains whitespace or control characters: remove them.")
    if "://" not in url:
        scheme = re.match(r"(?i)(https?):", url)
        if scheme:  # "http:/host", "http:host"
            raise ValueError(f"base_url {shown} has no host after '{scheme[1]}://': e.g. {_EXAMPLE}.")
        raise ValueError(f"base_url {shown} has no scheme: write base_url='http://{url}' (or https://).")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced "[" or "]"
        raise ValueError(
            f"base_url {shown} is not a valid URL: an IPv6 address goes in brackets, e.g. 'http://[::1]:8000/v1'."
        ) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"base_url {shown} has the scheme {parts.scheme!r}: use http or https, e.g. {_EXAMPLE}.")
    _check_host(parts.netloc, shown)
    if "?" in url or "#" in url:
        what = "query string" if "?" in url else "fragment"
        raise ValueError(
            f"base_url {shown} has a {what}, which the request paths would be appended to: remove it; "
            "query parameters for every request go in httpx_client_kwargs={'params': {...}}."
        )
    path = parts.path.rstrip("/")
    for endpoint in _ENDPOINTS:
        if path.endswith(endpoint):
            raise ValueError(
                f"base_url {shown} names the endpoint {endpoint}: the client adds it; "
                f"pass base_url={url.rstrip('/')[: -len(endpoint)]!r}."
            )
    return url


def _check_host(netloc: str, shown: str) -> None:
    """A host name, an IPv4 address or a bracketed IPv6 address, then an optional port 1-65535."""
    if netloc.startswith("["):
        host, _, port = netloc[1:].partition("]")
        try:
            ipaddress.IPv6Address(unquote(host))
        except ValueError:
            raise ValueError(
                f"base_url {shown}: {host!r} in brackets is not an IPv6 address; e.g. 'http://[::1]:8000/v1'."
            ) from None
        port = port.removeprefix(":")
    elif netloc.count(":") > 1:
        raise ValueError(f"base_url {shown}: an IPv6 address goes in brackets, e.g. 'http://[::1]:8000/v1'.")
    else:
        host, _, port = netloc.partition(":")
        _check_host_name(host, shown)
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"base_url {shown}: the port {port!r} is not a number in 1-65535, e.g. :8000.")


def _check_host_name(host: str, shown: str) -> None:
    if not host:
        raise ValueError(f"base_url {shown} has no host: e.g. {_EXAMPLE}.")
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"base_url {shown}: {host!r} is not a valid IPv4 address (four numbers 0-255).") from None
        return
    try:
        ascii_labels = [label.encode("idna").decode("ascii") if not label.isascii() else label for label in labels]
    except UnicodeError:
        ascii_labels = [""]
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in ascii_labels):
        raise ValueError(
            f"base_url {shown}: {host!r} is not a valid host name (letters, digits, '-' and '.' only); "
            f"e.g. {_EXAMPLE}."
        )


def check_headers(headers: Mapping[str, str] | None, field: str) -> None:
    """Refuse what would fail only at the first request: a raw ValueError (a line break, non-ASCII) or a
    400 that reads as the server's fault (a space in a name)."""
    for name, value in (headers or {}).items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(
                f"{field} has the header name {name!r}: use letters, digits and '-' only, e.g. 'X-Team'."
            )
        if isinstance(value, str) and not _HEADER_VALUE.fullmatch(value):
            shown = _shown(value, name)
            raise ValueError(
                f"{field}[{name!r}]={shown} holds a line break, a control or a non-ASCII character, which "
                "HTTP headers cannot carry: remove it (or percent-encode the value)."
            )


def check_httpx_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Refuse names httpx's AsyncClient does not take (a typo would fail only at load, as a TypeError)."""
    if kwargs is None:
        return None
    import httpx2

    known = [name for name in inspect.signature(httpx2.AsyncClient.__init__).parameters if name != "self"]
    unknown = [name for name in kwargs if name not in known]
    if unknown:
        hints = [f"did you mean {close[0]!r} for {name!r}" for name in unknown
                 if (close := difflib.get_close_matches(str(name), known, n=1))]
        raise ValueError(
            f"httpx_client_kwargs has {', '.join(map(repr, unknown))}, which httpx's AsyncClient does not take"
            + (f" ({'; '.join(hints)}?)" if hints else "") + f"; it takes: {', '.join(known)}."
        )
    if isinstance(kwargs.get("headers"), Mapping):
        check_headers(kwargs["headers"], "httpx_client_kwargs['headers']")
    return kwargs


# -- pydantic's errors as one ConfigurationError -----------------------------------------------------


@contextlib.contextmanager
def setting_errors(fields: Mapping[str, Any]) -> Iterator[None]:
    """Turn a pydantic ValidationError into a ConfigurationError naming each bad setting and its fix."""
    try:
        yield
    except ValidationError as exc:
        lines = [_describe(error, fields) for error in exc.errors(include_url=False)]
        head = "invalid setting" if len(lines) == 1 else f"{len(lines)} invalid settings"
        # from None: pydantic's own text would show the values (secrets included) once more
        raise ConfigurationError(f"{exc.title}: {head}:\n  " + "\n  ".join(lines)) from None


def _describe(error: ErrorDetails, fields: Mapping[str, Any]) -> str:
    loc = error["loc"]
    rule = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if not loc:  # a check across fields: our own message says it all
        return rule
    name = str(loc[0])
    if error["type"] in ("extra_forbidden", "no_such_attribute"):  # no value shown: a misspelt api_key is a key
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{name}: unknown setting; {hint}known settings: {', '.join(fields)}."
    if error["type"] == "value_error":  # our validators' messages name the value and the fix
        return rule
    path = name + "".join(f"[{part!r}]" for part in loc[1:])
    if name == "api_key":
        value = " (value hidden)"
    else:
        value = "=" + _shown(error.get("input"), loc[-1] if len(loc) > 1 else None)
    return f"{path}{value}: {rule}. {_EXPECTED.get(name, '')}".rstrip()
