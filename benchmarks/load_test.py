"""Load test: N inputs through vllmclient against a faulty fake vLLM; every input ends exactly once.

The server is ``benchmarks/fake_server.js`` with seeded random faults: a share ``--fault-rate`` of the
generation requests (retries included) gets one fault, drawn among 500, 503 (short Retry-After), 429, 502
with an HTML page, a connection reset, a 200 cut off mid-body and a complete 200 whose JSON is truncated.
A seeded share ``--poison-rate`` of the inputs carries a marker that the server refuses as vLLM refuses a
too-long prompt (400, ``param: "input_tokens"``), so a pack holding one fails whole and the client must
split it to find the guilty input.

Cases, each in its own process (so peak RSS is its own) with its own server:

- ``completions``: client-side chat template (the tiny tokenizer), packed prompts to ``/v1/completions``;
- ``chat``: ``tokenizer=None``, packed conversations to ``/v1/chat/completions/batch``;
- ``chat-single``: ``tokenizer=None, pack_size=1``, one conversation per request to ``/v1/chat/completions``
  (the chat path before packing);

each through ``aiter_generate`` over a lazy generator of N inputs, and through ``generate`` over a list of
``--generate-n`` inputs. The checker asserts that every index ends exactly once, as a result (whose text
echoes its own input's tag) or as an error record naming that index; that the poisoned inputs are errors;
and that the error records, by kind, are exactly what the server's own count of final faults predicts:

- ``PromptTooLongError`` (400): the poison 400s the server sent for a single prompt;
- ``ServerError`` 500/502/503, ``APIError`` 429, ``ConnectionLostError`` (reset, cut): the prompts of
  requests that got that fault on their last try (``x-stainless-retry-count == max_retries``);
- ``APIError`` 200 (unreadable answer): every ``truncated`` fault, whatever the try; the SDK does not
  retry a 200, so one fails its whole pack.

One kind the server cannot count, as nothing reached it: once a request could not connect even after its
retries, the client fails the packs it sends next with ``ServerUnreachableError`` "Not sent: ..." until a
request gets through. None of these faults is a failure to connect (a reset or a cut connection was
accepted first: ``ConnectionLostError``), so here any such record is a problem.

Peak RSS (``ru_maxrss``) is sampled after each tenth of the outputs of an ``aiter_generate`` run;
flat means the last sample is within 10% of the first. ``generate`` keeps every result, so its RSS grows
with N by design and is only reported.

Commands (from the repository root)::

    .venv/bin/python benchmarks/load_test.py                 # 100,000 inputs per case, generate 10,000
    .venv/bin/python benchmarks/load_test.py --n 3000 --generate-n 1000 --max-retries 1 --fault-rate 0.1

``tests/test_load.py`` runs the same checker on a few thousand inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

HERE = Path(__file__).resolve().parent
ROOT = str(HERE.parent)  # the work tree's vllmclient wins over an installed one
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

APIS = ("completions", "chat", "chat-single")
CALLS = ("aiter_generate", "generate")
POISON = "~poison~"
NOT_SENT = "ServerUnreachableError, not sent"  # the client gave up on a server it could not connect to
WORDS = ("river", "garden", "window", "letter", "engine", "market", "winter", "island", "silver", "forest",
         "signal", "vector", "kernel", "buffer", "packet", "thread", "token", "batch", "queue", "quiet")
# Fault kind → the error record it leaves when it is final: (type, status_code).
FAULT_RECORDS = {
    "500": ("ServerError", 500), "502": ("ServerError", 502), "503": ("ServerError", 503),
    "429": ("APIError", 429), "reset": ("ConnectionLostError", None), "cut": ("ConnectionLostError", None),
    "truncated": ("APIError", 200),
}
RETRIED = frozenset(FAULT_RECORDS) - {"truncated"}  # what the SDK retries


# ---------------------------------------------------------------- the fake server


class FakeServer:
    """``benchmarks/fake_server.js`` on a free port of 127.0.0.1, stopped on exit."""

    def __init__(self, *, fault_rate: float, seed: int, poison: bool = True, latency_ms: float = 0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), "--fault-rate", str(fault_rate), "--seed", str(seed),
                     "--latency", str(latency_ms)] + (["--poison", POISON] if poison else [])
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(["node", str(HERE / "fake_server.js"), *self.args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.stats()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"the fake server did not start: node {' '.join(self.args)}")

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=30) as r:
            return dict(json.loads(r.read()))


# ---------------------------------------------------------------- workload and checker


def inputs(n: int, seed: int, poison_rate: float, poisoned: bytearray) -> Iterator[list[dict[str, str]]]:
    """N one-message conversations tagged ``[[qI]]``; a seeded share carries the poison (marked in ``poisoned``)."""
    rng = random.Random(seed)
    for i in range(n):
        words = " ".join(rng.choices(WORDS, k=rng.randint(5, 10)))
        bad = rng.random() < poison_rate
        poisoned[i] = bad
        yield [{"role": "user", "content": f"[[q{i}]] {words}" + (f" {POISON}" if bad else "")}]


class Tally:
    """What came back, index by index: 1 = a result, 2 = an error record; anything else is a problem."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = bytearray(n)
        self.errors: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []

    def add(self, index: int, output: Any) -> None:
        if not isinstance(index, int) or not 0 <= index < self.n:
            return self._problem(f"an output for index {index!r}, outside 0..{self.n - 1}")
        if self.seen[index]:
            return self._problem(f"input {index} came back twice")
        error = output.get("error")
        if error is not None:
            self.seen[index] = 2
            not_sent = error.type == "ServerUnreachableError" and error.message.startswith("Not sent:")
            self.errors[NOT_SENT if not_sent else error_key(error.type, error.status_code)] += 1
            if error.index != index or output["generations"] != [None]:
                self._problem(f"input {index}: error record {error!r} with generations {output['generations']!r}")
        else:
            self.seen[index] = 1
            text = output["generations"][0]
            if not isinstance(text, str) or not text.startswith(f"q{index} "):
                self._problem(f"input {index}: result {text!r:.60} is not its own")

    def _problem(self, what: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(what)

    def finish(self, poisoned: bytearray) -> None:
        missing = self.seen.count(0)
        if missing:
            self._problem(f"{missing} inputs never came back, the first: {self.seen.index(0)}")
        lucky = sum(1 for i in range(self.n) if poisoned[i] and self.seen[i] == 1)
        if lucky:
            self._problem(f"{lucky} poisoned inputs got a result")


def error_key(type_: str, status: int | None) -> str:
    return type_ if status is None else f"{type_} {status}"


def expected_errors(stats: dict[str, Any], max_retries: int) -> collections.Counter[str]:
    """The error records the server's own counts predict (see the module docstring)."""
    expected: collections.Counter[str] = collections.Counter()
    if stats["poisoned"]["single"]:
        expected["PromptTooLongError 400"] = stats["poisoned"]["single"]
    for kind, by_retry in stats["fault_prompts"].items():
        final = sum(by_retry.values()) if kind not in RETRIED else by_retry.get(str(max_retries), 0)
        if final:
            expected[error_key(*FAULT_RECORDS[kind])] += final
    return expected


def unexplained(errors: collections.Counter[str], expected: collections.Counter[str]) -> list[str]:
    """What in ``errors`` the server's counts do not explain (empty when all is well)."""
    answered = errors.copy()
    not_sent = answered.pop(NOT_SENT, 0)
    problems = []
    if expected != answered:
        problems.append(f"error records {dict(answered)} but the server's faults predict {dict(expected)}")
    if not_sent and not expected["ServerUnreachableError"]:
        problems.append(f"{not_sent} inputs not sent, though every request reached the server in the end")
    return problems


# ---------------------------------------------------------------- one case


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(server: FakeServer, *, api: str, call: str, n: int, seed: int, poison_rate: float, max_retries: int,
             concurrency: int, tokenizer: str | None) -> dict[str, Any]:
    """Run one case against a started server and check it; ``problems`` lists every broken invariant."""
    from vllmclient import ClientvLLM

    llm = ClientvLLM(base_url=f"{server.url}/v1", tokenizer=tokenizer if api == "completions" else None,
                     max_concurrency=concurrency, max_retries=max_retries, pack_size=1 if api == "chat-single" else None)
    llm.load()
    tally, poisoned, rss = Tally(n), bytearray(n), []
    before = server.stats()
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if call == "generate":
        for index, output in enumerate(llm.generate(list(inputs(n, seed, poison_rate, poisoned)), progress=False)):
            tally.add(index, output)
    else:
        step = max(n // 10, 1)

        async def consume() -> None:
            count = 0
            async for index, output in llm.aiter_generate(inputs(n, seed, poison_rate, poisoned), progress=False):
                tally.add(index, output)
                count += 1
                if count % step == 0:
                    rss.append(round(rss_peak_mb(), 1))

        asyncio.run(consume())
    wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    llm.close()
    stats = server.stats()
    tally.finish(poisoned)
    tally.problems += unexplained(tally.errors, expected_errors(stats, max_retries))
    if before["received"]:
        tally.problems.append("the server had answered generation requests before this case: its counts are not ours")
    return {
        "api": api, "call": call, "n": n, "max_retries": max_retries, "wall_s": round(wall, 2),
        "inputs_per_s": round(n / wall), "client_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 1),
        "results": tally.seen.count(1), "errors": dict(sorted(tally.errors.items())), "poisoned": sum(poisoned),
        "server_requests": stats["received"], "server_answered_200": stats["requests"],
        "faults": dict(sorted(stats["faults"].items())), "fault_prompts": stats["fault_prompts"],
        "poison_400s": stats["poisoned"], "peak_rss_mb_each_tenth": rss, "peak_rss_mb": round(rss_peak_mb(), 1),
        "rss_flat": bool(rss) and rss[-1] <= 1.10 * rss[0], "problems": tally.problems,
    }


# ---------------------------------------------------------------- command line


def child(a: argparse.Namespace) -> dict[str, Any]:
    with FakeServer(fault_rate=a.fault_rate, seed=a.seed) as server:
        return run_case(server, api=a.api, call=a.call, n=a.n, seed=a.seed, poison_rate=a.poison_rate,
                        max_retries=a.max_retries, concurrency=a.concurrency, tokenizer=a.tokenizer)


def show(rec: dict[str, Any]) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in rec["errors"].items()) or "none"
    faults = ", ".join(f"{k}: {v}" for k, v in rec["faults"].items())
    lines = [
        (f"{rec['api']} / {rec['call']}: {rec['n']:,} inputs in {rec['wall_s']} s = {rec['inputs_per_s']:,} inputs/s "
        f"(client CPU {rec['client_cpu_s']} s); {rec['results']:,} results, {sum(rec['errors'].values()):,} errors"),
        f"  error records: {errors} ({rec['poisoned']} inputs poisoned)",
        (f"  server: {rec['server_requests']:,} requests incl. retries, {rec['server_answered_200']:,} answered 200; "
        f"faults: {faults}; poison 400s: {rec['poison_400s']['requests']} ({rec['poison_400s']['single']} single)"),
        f"  peak RSS MB after each tenth: {rec['peak_rss_mb_each_tenth'] or '-'}; peak {rec['peak_rss_mb']} MB"
        + (f", flat: {'yes' if rec['rss_flat'] else 'NO'}" if rec["peak_rss_mb_each_tenth"] else ""),
        "  check: " + ("ok" if not rec["problems"] else "FAIL: " + "; ".join(rec["problems"])),
    ]
    return "\n".join(lines)


def parent(a: argparse.Namespace) -> int:
    from vllmclient.tiny_model import build_tokenizer

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokdir = str(build_tokenizer(tmp))
        print(f"fault rate {a.fault_rate:g}, poison rate {a.poison_rate:g}, max_retries {a.max_retries}, "
              f"{a.concurrency} in flight, seed {a.seed}\n", flush=True)
        for api in a.apis.split(","):
            for call, n in (("aiter_generate", a.n), ("generate", a.generate_n)):
                if not n:
                    continue
                cmd = [sys.executable, __file__, "--child", "--api", api, "--call", call, "--n", str(n),
                       "--seed", str(a.seed), "--fault-rate", str(a.fault_rate), "--poison-rate", str(a.poison_rate),
                       "--max-retries", str(a.max_retries), "--concurrency", str(a.concurrency), "--tokenizer", tokdir]
                p = subprocess.run(cmd, check=False, capture_output=True, text=True)
                try:
                    rec = json.loads(p.stdout.strip().splitlines()[-1])
                except (IndexError, ValueError):
                    print(f"{api} / {call}: FAIL (rc={p.returncode})\n{p.stderr[-3000:]}", flush=True)
                    failed += 1
                    continue
                print(show(rec) + "\n", flush=True)
                failed += bool(rec["problems"]) or (call == "aiter_generate" and not rec["rss_flat"])
    return 1 if failed else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="inputs per aiter_generate run")
    p.add_argument("--generate-n", type=int, default=10_000, help="inputs per generate run (0: none)")
    p.add_argument("--apis", default=",".join(APIS), help="completions (packed), chat (packed), chat-single (one per conversation)")
    p.add_argument("--fault-rate", type=float, default=0.05, help="share of requests that get a fault")
    p.add_argument("--poison-rate", type=float, default=0.001, help="share of inputs the server refuses (400)")
    p.add_argument("--max-retries", type=int, default=6, help="the client's max_retries (its default: 6)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--api", help=argparse.SUPPRESS)
    p.add_argument("--call", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
    else:
        sys.exit(parent(a))


if __name__ == "__main__":
    main()
