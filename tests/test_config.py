"""ClientvLLM's settings: every invalid one is a ConfigurationError that says what and how to fix it,
base_url is checked before anything is sent, and no secret shows in any text the client produces."""

from __future__ import annotations

import logging
import traceback

import pytest

from vllmclient import AuthenticationError, ClientvLLM, ConfigurationError, VLLMClientError

SECRET = "s3cr3t-P4ss"


def _all_text(exc: BaseException) -> str:
    """Everything a traceback would print, causes and contexts included."""
    return "".join(traceback.format_exception(exc))


def _raised(call, *args, **kwargs) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        call(*args, **kwargs)
    assert isinstance(info.value, VLLMClientError)
    assert isinstance(info.value, ValueError)  # as pydantic's ValidationError was: `except ValueError` still works
    return info.value


# -- invalid fields, however they are set ------------------------------------------------------------

BAD_FIELDS = [
    # (field, value, words the message must hold: the field and value, the rule, the fix)
    ("max_retries", -1, ["max_retries=-1", "greater than or equal to 0", "max_retries=6"]),
    ("max_retries", "many", ["max_retries='many'", "valid integer", "max_retries=6"]),
    ("timeout", "x", ["timeout='x'", "valid number", "timeout=120"]),
    ("timeout", 0, ["timeout=0", "greater than 0", "timeout=120"]),
    ("timeout", -5, ["timeout=-5", "greater than 0", "timeout=120"]),
    ("timeout", float("inf"), ["timeout=inf", "finite number", "timeout=120"]),
    ("timeout", float("nan"), ["timeout=nan", "timeout=120"]),
    ("max_concurrency", 0, ["max_concurrency=0", "greater than or equal to 1", "max_concurrency=256"]),
    ("pack_size", 0, ["pack_size=0", "greater than or equal to 1", "pack_size=None"]),
    ("pack_size", 5000, ["pack_size=5000", "less than or equal to 1024", "pack_size=None"]),
    ("tokenizer_check", "strict", ["tokenizer_check='strict'", "'warn', 'error' or 'off'"]),
    ("trust_remote_code", "maybe", ["trust_remote_code='maybe'", "valid boolean", "True or False"]),
    ("default_headers", {"X-Trace": 5}, ["default_headers['X-Trace']=5", "valid string", "default_headers="]),
    ("default_headers", {"X-Team": "a\r\nX-Evil: 1"}, ["default_headers['X-Team']", "line break", "remove it"]),
    ("default_headers", {"X-Team": "café"}, ["default_headers['X-Team']='café'", "non-ASCII"]),
    ("default_headers", {"X Team": "a"}, ["'X Team'", "letters, digits and '-'"]),
    ("httpx_client_kwargs", {"headers": {"X-Team": "a\nb"}},
     ["httpx_client_kwargs['headers']['X-Team']", "line break"]),
    ("httpx_client_kwargs", {"verfy": False}, ["httpx_client_kwargs", "'verfy'", "did you mean 'verify'"]),
    ("generation_kwargs", ["temperature"], ["generation_kwargs=['temperature']", "valid dictionary"]),
    ("generation_kwargs", {"temprature": 0.5}, ["generation_kwargs", "'temprature'", "did you mean 'temperature'"]),
    ("generation_kwargs", {"temperature": "hot"}, ["generation_kwargs", "temperature='hot'"]),
]


@pytest.mark.parametrize(("field", "value", "words"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_an_invalid_field_is_a_configuration_error_at_construction(field, value, words):
    message = str(_raised(ClientvLLM, **{field: value}))
    for word in words:
        assert word in message, (word, message)
    assert "pydantic" not in message  # our words, not a link to pydantic's docs


@pytest.mark.parametrize(("field", "value", "words"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_an_invalid_field_is_a_configuration_error_on_assignment(field, value, words):
    llm = ClientvLLM()
    before = getattr(llm, field)
    message = str(_raised(setattr, llm, field, value))
    for word in words:
        assert word in message, (word, message)
    assert getattr(llm, field) == before  # nothing changed


def test_every_invalid_field_is_named_at_once():
    message = str(_raised(ClientvLLM, max_retries=-1, timeout="x", max_concurrency=0))
    assert "3 invalid settings" in message
    for word in ("max_retries=-1", "timeout='x'", "max_concurrency=0"):
        assert word in message


def test_an_unknown_field_is_named_with_the_likely_one():
    message = str(_raised(ClientvLLM, base_urll="http://localhost:8000"))
    assert "base_urll" in message and "unknown" in message and "did you mean 'base_url'" in message
    message = str(_raised(setattr, ClientvLLM(), "api_kye", SECRET))
    assert "api_kye" in message and "unknown" in message and "did you mean 'api_key'" in message
    assert SECRET not in message


def test_model_validate_and_json_raise_configuration_errors():
    assert "timeout=-1" in str(_raised(ClientvLLM.model_validate, {"timeout": -1}))
    assert "timeout=-1" in str(_raised(ClientvLLM.model_validate_json, '{"timeout": -1}'))
    assert "timeout" in str(_raised(ClientvLLM.model_validate_strings, {"timeout": "soon"}))


def test_set_runtime_parameters_names_every_bad_one_and_changes_nothing():
    llm = ClientvLLM()
    message = str(_raised(llm.set_runtime_parameters, {"timeout": -1, "max_retries": "many", "base_url":
                                                       "http://127.0.0.1:9/v1"}))
    assert "timeout=-1" in message and "max_retries='many'" in message
    assert (llm.timeout, llm.max_retries, llm.base_url) == (120, 6, "http://localhost:8000")


def test_distilabel_only_fields_and_magpie_check_are_configuration_errors():
    message = str(_raised(ClientvLLM, use_offline_batch_generation=True))
    assert "use_offline_batch_generation=True is not supported" in message and "checkpoint" in message
    message = str(_raised(ClientvLLM, use_magpie_template=True))
    assert "magpie_pre_query_template" in message


@pytest.mark.filterwarnings("ignore:`verify=<str>` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"verify": "/no/such/ca.pem"}, ["FileNotFoundError"]),
     ({"proxy": f"socks9://user:{SECRET}@proxy:1080"}, ["proxy", "socks9://****@proxy:1080"])],
    ids=["verify-missing-file", "proxy-scheme"],
)
def test_httpx_client_kwargs_that_cannot_build_a_client_fail_at_load_as_configuration_error(kwargs, words):
    llm = ClientvLLM(base_url="http://127.0.0.1:9", httpx_client_kwargs=kwargs)
    error = _raised(llm.load)
    assert "httpx_client_kwargs" in str(error) and "cannot build the HTTP client" in str(error)
    for word in words:
        assert word in str(error), (word, str(error))
    assert SECRET not in _all_text(error)
    llm.close()


# -- base_url ------------------------------------------------------------------------------------------

BAD_URLS = [
    # (base_url, words the message must hold)
    ("http://local host:8000", ["whitespace", "'http://local host:8000'"]),
    ("http://localhost:8000/v1\n/x", ["whitespace"]),
    ("", ["empty", "http://localhost:8000/v1"]),
    ("   ", ["empty"]),
    ("localhost:8000", ["no scheme", "'http://localhost:8000'"]),
    ("127.0.0.1:8000/v1", ["no scheme", "'http://127.0.0.1:8000/v1'"]),
    ("ftp://host/v1", ["http or https", "'ftp'"]),
    ("htp://localhost:8000", ["http or https"]),
    ("http:/localhost:8000", ["no host"]),
    ("http://:8000/v1", ["no host"]),
    ("http://", ["no host"]),
    ("http://host:99999", ["port", "1-65535"]),
    ("http://host:0/v1", ["port", "1-65535"]),
    ("http://host:abc", ["port", "1-65535"]),
    ("http://::1:8000", ["IPv6", "brackets", "http://[::1]:8000"]),
    ("http://[::1:8000", ["IPv6", "brackets"]),
    ("http://[not-ip]:8000", ["IPv6"]),
    ("http://300.1.1.1:8000", ["IPv4", "300.1.1.1"]),
    ("http://10.0.0:8000", ["IPv4"]),
    ("http://-bad-.example:8000", ["host"]),
    ("http://a..b:8000", ["host"]),
    ("http://host%20name:8000", ["host"]),
    ("http://host:8000/v1?api-version=1", ["query", "httpx_client_kwargs={'params'"]),
    ("http://host:8000/v1?", ["query"]),
    ("http://host:8000/v1#frag", ["fragment"]),
    ("http://host:8000/v1/chat/completions", ["/chat/completions", "'http://host:8000/v1'"]),
    ("http://host:8000/v1/completions/", ["/completions", "'http://host:8000/v1'"]),
    ("http://host:8000/v1/models", ["/models", "'http://host:8000/v1'"]),
]


@pytest.mark.parametrize(("url", "words"), BAD_URLS, ids=[repr(u) for u, _ in BAD_URLS])
def test_a_base_url_that_cannot_work_is_refused_at_once(url, words):
    message = str(_raised(ClientvLLM, base_url=url))
    assert "base_url" in message
    for word in words:
        assert word in message, (word, message)
    llm = ClientvLLM()
    assert "base_url" in str(_raised(setattr, llm, "base_url", url))
    assert "base_url" in str(_raised(llm.set_runtime_parameters, {"base_url": url}))


GOOD_URLS = [
    ("http://localhost:8000", "http://localhost:8000"),
    ("http://localhost:8000/v1/", "http://localhost:8000/v1/"),
    ("https://vllm.example.com/v1", "https://vllm.example.com/v1"),
    ("HTTP://LOCALHOST:8000/v1", "HTTP://LOCALHOST:8000/v1"),
    ("http://[::1]:8000/v1", "http://[::1]:8000/v1"),
    ("http://[fe80::1%25eth0]:8000", "http://[fe80::1%25eth0]:8000"),
    ("http://192.168.1.20:8000", "http://192.168.1.20:8000"),
    ("http://vllm_server:8000/v1", "http://vllm_server:8000/v1"),  # a Docker Compose service name
    ("http://gpu-box.local.:8000", "http://gpu-box.local.:8000"),
    ("http://bücher.example:8000", "http://bücher.example:8000"),
    ("https://proxy.example/team/vllm/v1", "https://proxy.example/team/vllm/v1"),
    ("  http://localhost:8000/v1\n", "http://localhost:8000/v1"),  # pasted from a file or $(cat ...)
]


@pytest.mark.parametrize(("url", "stored"), GOOD_URLS, ids=[repr(u) for u, _ in GOOD_URLS])
def test_a_base_url_that_can_work_is_accepted(url, stored):
    assert ClientvLLM(base_url=url).base_url == stored


# -- secrets -------------------------------------------------------------------------------------------

CREDENTIAL_URLS = [
    f"http://user:{SECRET}@localhost:8000/v1",
    f"https://{SECRET}@vllm.example.com/v1",
    f"http://user:{SECRET}@[::1]:8000",
    f"http://user:{SECRET}@local host:8000",  # two faults: still no secret in the message
]


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
def test_a_base_url_with_credentials_is_refused_without_showing_them(url):
    error = _raised(ClientvLLM, base_url=url)
    text = _all_text(error)
    assert SECRET not in text
    assert "****@" in text  # the URL is shown masked
    assert "api_key=" in str(error) and "VLLM_API_KEY" in str(error)
    llm = ClientvLLM()
    assert SECRET not in _all_text(_raised(setattr, llm, "base_url", url))
    assert SECRET not in _all_text(_raised(llm.set_runtime_parameters, {"base_url": url}))
    assert SECRET not in _all_text(_raised(ClientvLLM.model_validate_json, f'{{"base_url": "{url}"}}'))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"api_key": 12345, "timeout": -1},
        {"api_kye": SECRET},  # a typo in the field name: its value may well be the key
        {"default_headers": {"Authorization": f"Bearer {SECRET}", "X-Trace": 5}},
        {"default_headers": {"X-Api-Key": SECRET}, "timeout": "x"},
        {"default_headers": {"Authorization": f"Bearer {SECRET}\n"}},
        {"httpx_client_kwargs": {"auth": ("user", SECRET), "verfy": False}},
        {"httpx_client_kwargs": {"proxy": f"http://user:{SECRET}@proxy:3128", "verfy": False}},
        {"httpx_client_kwargs": {"headers": {"Authorization": SECRET}}, "max_retries": -1},
    ],
    ids=["api_key", "unknown-field", "header-auth", "header-api-key", "header-auth-bad", "httpx-auth", "httpx-proxy",
         "httpx-headers"],
)
def test_no_secret_in_configuration_errors(kwargs):
    text = _all_text(_raised(ClientvLLM, **kwargs))
    assert SECRET not in text and "12345" not in text


def test_no_secret_in_repr_str_or_dumps_and_they_still_reach_the_server(fake_vllm, tokenizer_dir, caplog):
    llm = ClientvLLM(
        base_url=fake_vllm.base_url, tokenizer=tokenizer_dir, api_key=f"key-{SECRET}",
        default_headers={"Authorization": f"Bearer {SECRET}", "X-Pipeline": "magpie"},
        httpx_client_kwargs={"proxy": f"http://user:{SECRET}@proxy.invalid:3128", "trust_env": False,
                             "headers": {"X-Api-Key": SECRET}},
    )
    texts = [repr(llm), str(llm), llm.model_dump_json(), str(llm.model_dump()), repr(llm.model_dump()),
             str(llm.model_dump(mode="json"))]
    for text in texts:
        assert SECRET not in text, text
    assert "X-Pipeline" in repr(llm) and "magpie" in llm.model_dump_json()  # only the secrets are hidden

    # model_dump() round-trips (the secrets are kept, hidden, as pydantic does for SecretStr)
    again = ClientvLLM(**llm.model_dump())
    assert again.default_headers == llm.default_headers
    assert again.httpx_client_kwargs == llm.httpx_client_kwargs

    # a working client: the secrets reach the server, and nothing the client logs holds them
    plain = ClientvLLM(base_url=fake_vllm.base_url, tokenizer=tokenizer_dir,
                       default_headers={"X-Api-Key": SECRET}, httpx_client_kwargs={"trust_env": False})
    with caplog.at_level(logging.DEBUG, logger="vllmclient"):
        plain.generate_outputs([[{"role": "user", "content": "hi"}]])
    assert fake_vllm.requests_to("/v1/completions")[-1].headers["x-api-key"] == SECRET
    assert SECRET not in caplog.text and SECRET not in repr(plain)
    plain.close()


def test_a_refused_key_is_not_in_the_error_or_the_error_record(make_fake_vllm, tokenizer_dir):
    server = make_fake_vllm(api_key="the-right-key")
    llm = ClientvLLM(base_url=server.base_url, tokenizer=tokenizer_dir, api_key=SECRET, max_retries=0)
    with pytest.raises(AuthenticationError) as info:
        llm.load()
    assert SECRET not in _all_text(info.value)
    llm.close()
