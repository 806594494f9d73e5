"""Network failures named for what they are, over real sockets on 127.0.0.1 (issue #9).

A refused connection, an unknown host, a TLS failure, a dropped connection and a generation slower than
``timeout`` each get their own error and advice; a timed-out generation is sent once (re-sending it
would only repeat the wait), connection errors keep the SDK's retries. The open-file limit is respected:
the defaults work under macOS's 256, and running out of descriptors anyway is reported as a local limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx2
import pytest

import vllmclient
from vllmclient import (
    ClientvLLM,
    ConfigurationError,
    ConnectionLostError,
    ServerTimeoutError,
    ServerUnreachableError,
)

from fake_vllm import FakeVLLM

MODES = ["template", "chat"]  # tokenizer=str(tokenizer_dir) → /v1/completions; tokenizer=None → chat
PATHS = {"template": "/v1/completions", "chat": "/v1/chat/completions"}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def tagged(count: int) -> list[list[dict[str, str]]]:
    return [user(f"[[q{i}]] tell me something") for i in range(count)]


def make_client(base_url: str, mode: str, tokenizer_dir: Path, **kwargs: Any) -> ClientvLLM:
    tokenizer = str(tokenizer_dir) if mode == "template" else None
    return ClientvLLM(base_url=base_url, tokenizer=tokenizer, **kwargs)


def retry_counts(server: FakeVLLM, path: str) -> list[str | None]:
    """The SDK's attempt number of every request the server saw on ``path``."""
    return [request.headers.get("x-stainless-retry-count") for request in server.requests_to(path)]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- could not connect: refused, unknown host, TLS --------------------------------------------------


def test_a_refused_connection_says_so_and_names_the_url(tokenizer_dir):
    url = f"http://127.0.0.1:{closed_port()}"
    llm = ClientvLLM(base_url=url, tokenizer=str(tokenizer_dir), max_retries=1)
    with pytest.raises(ServerUnreachableError) as info:
        llm.load()
    message = str(info.value)
    assert "refused" in message and f"{url}/v1" in message and "vllm serve" in message
    assert "in time" not in message and "timeout" not in message
    llm.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_server_gone_after_load_is_refused_for_each_input(tokenizer_dir, mode):
    server = FakeVLLM(tokenizer_dir).start()
    llm = make_client(server.base_url, mode, tokenizer_dir, max_retries=1)  # one retry: a stale pooled socket
    try:
        llm.load()
        server.stop()
        outputs = llm.generate(tagged(3), max_new_tokens=4)
    finally:
        server.stop()
        llm.close()
    for output in outputs:
        error = output["error"]
        assert error.type == "ServerUnreachableError" and isinstance(error.exception, ServerUnreachableError)
        assert "refused" in error.message and server.base_url in error.message


def test_an_unknown_host_is_a_name_resolution_failure(tokenizer_dir):
    llm = ClientvLLM(base_url="http://vllm-server.invalid:8000", tokenizer=str(tokenizer_dir), max_retries=0)
    with pytest.raises(ServerUnreachableError) as info:
        llm.load()
    message = str(info.value)
    assert "vllm-server.invalid" in message and "could not be resolved" in message
    assert "in time" not in message
    llm.close()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        _certificate_with_cryptography(cert, key)
    except ImportError:
        openssl = shutil.which("openssl")
        assert openssl, "these tests need the `cryptography` package or the `openssl` command"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )
    return cert, key


def _certificate_with_cryptography(cert: Path, key: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    built = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def test_https_to_a_plain_http_server_is_a_tls_failure(fake_vllm, tokenizer_dir):
    url = fake_vllm.base_url.replace("http://", "https://")
    llm = ClientvLLM(base_url=url, tokenizer=str(tokenizer_dir), max_retries=0)
    with pytest.raises(ServerUnreachableError) as info:
        llm.load()
    message = str(info.value)
    assert "TLS" in message and url in message and "http://" in message
    llm.close()


@pytest.mark.parametrize("mode", MODES)
def test_an_untrusted_certificate_is_named_once_and_verify_fixes_it(tokenizer_dir, certificate, mode):
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    handshakes: list[str | None] = []
    context.sni_callback = lambda _socket, name, _context: handshakes.append(name)  # type: ignore[assignment]
    with FakeVLLM(tokenizer_dir, ssl_context=context) as server:
        url = f"https://localhost:{server.port}"
        llm = make_client(url, mode, tokenizer_dir, max_retries=3)
        with pytest.raises(ServerUnreachableError) as info:
            llm.load()
        llm.close()
        message = str(info.value)
        assert "certificate" in message and "verify" in message and url in message
        assert handshakes == ["localhost"]  # not retried: the same certificate would fail again
        assert server.requests == []

        trusted = ssl.create_default_context(cafile=str(cert))
        with make_client(url, mode, tokenizer_dir, httpx_client_kwargs={"verify": trusted}) as llm:
            outputs = llm.generate(tagged(2), max_new_tokens=4)
    assert [output["generations"][0].split()[0] for output in outputs] == ["q0", "q1"]


# -- the connection dropped mid-request ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_dropped_connection_is_retried_then_named(fake_vllm, tokenizer_dir, mode):
    path = PATHS[mode]
    with make_client(fake_vllm.base_url, mode, tokenizer_dir, max_retries=2) as llm:
        fake_vllm.drop_next(path=path, times=3)
        lost = llm.generate(tagged(1), max_new_tokens=4)[0]["error"]
        assert retry_counts(fake_vllm, path) == ["0", "1", "2"]  # the SDK retried a dropped connection
        assert lost.type == "ConnectionLostError" and isinstance(lost.exception, ConnectionLostError)
        assert "dropped" in lost.message and "crashed or restarted" in lost.message
        assert fake_vllm.base_url in lost.message

        fake_vllm.clear()
        fake_vllm.drop_next(path=path, times=1)
        output = llm.generate(tagged(1), max_new_tokens=4)[0]
    assert "error" not in output and output["generations"][0].split()[0] == "q0"
    assert retry_counts(fake_vllm, path) == ["0", "1"]


def test_error_answers_keep_the_sdks_retries(fake_vllm, tokenizer_dir):
    with make_client(fake_vllm.base_url, "chat", tokenizer_dir, max_retries=2) as llm:
        fake_vllm.fail_next(503, path=PATHS["chat"], times=2)
        output = llm.generate(tagged(1), max_new_tokens=4)[0]
    assert "error" not in output and retry_counts(fake_vllm, PATHS["chat"]) == ["0", "1", "2"]


# -- no answer within timeout -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_generation_slower_than_timeout_is_sent_once_and_names_the_timeout(fake_vllm, tokenizer_dir, mode):
    path = PATHS[mode]
    with make_client(fake_vllm.base_url, mode, tokenizer_dir, timeout=0.8, max_retries=2) as llm:
        fake_vllm.latency = 3.0
        error = llm.generate(tagged(1), max_new_tokens=4)[0]["error"]
        assert error.type == "ServerTimeoutError" and isinstance(error.exception, ServerTimeoutError)
        assert "timeout=0.8 seconds" in error.message and "raise timeout=" in error.message
        assert "unreachable" not in error.message and "running?" not in error.message
        assert retry_counts(fake_vllm, path) == ["0"]

        fake_vllm.clear()
        with pytest.raises(ServerTimeoutError, match=r"timeout=0\.8 seconds"):
            asyncio.run(llm.agenerate(user("[[q0]] hi"), max_new_tokens=4))
        assert retry_counts(fake_vllm, path) == ["0"]

        fake_vllm.latency = 0.0  # the client is not broken by a timeout
        assert llm.generate(tagged(1), max_new_tokens=4)[0]["generations"][0].split()[0] == "q0"


@pytest.mark.parametrize("mode", MODES)
def test_one_slow_generation_fails_only_its_own_input(fake_vllm, tokenizer_dir, mode):
    """A server slow on one input is alive: the inputs after it are sent as usual (not failed as unreachable)."""
    fake_vllm.slow_prompts_containing("[[q0]]", 3.0)
    with make_client(fake_vllm.base_url, mode, tokenizer_dir, timeout=0.8, max_retries=2, max_concurrency=1,
                     pack_size=1) as llm:
        outputs = llm.generate(tagged(4), max_new_tokens=4)  # one at a time: q0 times out before q1 is sent
    assert outputs[0]["error"].type == "ServerTimeoutError"
    assert [output.get("error") for output in outputs[1:]] == [None] * 3
    assert [output["generations"][0].split()[0] for output in outputs[1:]] == ["q1", "q2", "q3"]
    assert retry_counts(fake_vllm, PATHS[mode]) == ["0"] * 4


def test_requests_never_wait_for_a_pooled_connection_against_their_timeout(fake_vllm, tokenizer_dir):
    """With fewer connections than slots, requests wait for a connection in the client's queue, where the
    wait does not count against ``timeout``, never in the pool (where it would, and slots would sit idle)."""
    fake_vllm.latency = 0.3
    kwargs = {"limits": httpx2.Limits(max_connections=2)}
    with make_client(fake_vllm.base_url, "chat", tokenizer_dir, max_concurrency=8, timeout=1.0, max_retries=0,
                     httpx_client_kwargs=kwargs) as llm:
        outputs = llm.generate(tagged(12), max_new_tokens=4)  # the last waits ~1.5 s for a connection
    assert [output.get("error") for output in outputs] == [None] * 12
    assert fake_vllm.max_in_flight_requests == 2


# -- the open-file limit ----------------------------------------------------------------------------

_PACKAGE_ROOT = str(Path(vllmclient.__file__).resolve().parent.parent)

_MANY_CHATS = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[3])))
    from vllmclient import ClientvLLM
    inputs = [[{"role": "user", "content": f"[[q{i}]] hello"}] for i in range(1500)]
    with ClientvLLM(base_url=sys.argv[1], tokenizer=None, pack_size=1) as llm:  # one request per conversation
        outputs = llm.generate(inputs, max_new_tokens=4, progress=False)
    errors = [o["error"].type + ": " + o["error"].message for o in outputs if "error" in o]
    right = sum("error" not in o and o["generations"][0].split()[0] == f"q{i}" for i, o in enumerate(outputs))
    print(json.dumps({"right": right, "errors": errors[:3], "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
""")

_OUT_OF_DESCRIPTORS = textwrap.dedent("""
    import json, os, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    from vllmclient import ClientvLLM
    inputs = [[{"role": "user", "content": f"[[q{i}]] hello"}] for i in range(300)]
    with ClientvLLM(base_url=sys.argv[1], tokenizer=None, max_retries=0) as llm:
        llm.generate(inputs[:4], max_new_tokens=4, progress=False)  # warm: lazy imports have opened their files
        hog = []
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        for fd in hog[-6:]:
            os.close(fd)  # a handful left: not enough for the connections the limit would allow
        outputs = llm.generate(inputs, max_new_tokens=4, progress=False)
    errors = [(o["error"].type, o["error"].message) for o in outputs if "error" in o]
    print(json.dumps({"errors": errors}))
""")


def _run_child(script: str, *args: object) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], check=False, capture_output=True, text=True, timeout=180,
        cwd=_PACKAGE_ROOT, env={**os.environ, "PYTHONPATH": _PACKAGE_ROOT},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("hard", [256, 4096], ids=["hard-256", "hard-4096"])
def test_many_chat_requests_fit_a_256_open_file_limit(tokenizer_dir, hard):
    """macOS's default soft limit is 256: chat with pack_size=1 sends one request per input, at most 256 at once by
    default."""
    with FakeVLLM(tokenizer_dir, latency=0.05) as server:
        result = _run_child(_MANY_CHATS, server.base_url, 256, hard)
        attempts = retry_counts(server, "/v1/chat/completions")
    assert result["errors"] == [] and result["right"] == 1500
    assert len(attempts) == 1500 and set(attempts) == {"0"}  # none failed first and succeeded on a retry
    assert result["soft"] == (256 if hard == 256 else 1024)  # raised within the hard limit, never past 1024


def test_running_out_of_file_descriptors_is_reported_as_the_local_limit(tokenizer_dir):
    with FakeVLLM(tokenizer_dir, latency=0.05) as server:
        result = _run_child(_OUT_OF_DESCRIPTORS, server.base_url)
    assert result["errors"], "the hogged descriptors should have made some inputs fail"
    for kind, message in result["errors"]:
        assert kind == ConfigurationError.__name__, message
        assert "open-file limit 256" in message and "ulimit -n" in message and "max_concurrency" in message
