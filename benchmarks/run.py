"""Client-overhead benchmark: vllmclient against raw aiohttp and the openai SDK, on a fake vLLM server.

What it measures. One run drives the same workload through each client kind, each kind in its own
subprocess, against ``benchmarks/fake_server.js`` (a Node fake of vLLM's ``/v1/completions``, far cheaper
per request than any Python client, warmed up before measuring). The workload is N chat inputs, each one
user message of 30-80 seeded words starting with a tag ``[[qI]]``; the server echoes the tag as the first
word of every choice, so count and order are checked ("ok"/"FAIL"). max_new_tokens=16, 64 in flight.
Kinds:

- ``aiohttp``: raw aiohttp loop, one request per prompt, semaphore 64, prompt rendered with the HF
  tokenizer's ``apply_chat_template(tokenize=False, add_generation_prompt=True)``, ``add_special_tokens:
  false`` in the body. The reference floor: every ratio is against it.
- ``openai``: ``openai.AsyncOpenAI`` (default httpx2 transport), semaphore 64, one ``completions.create``
  per prompt. ``openai-aiohttp``: the same with ``http_client=openai.DefaultAioHttpClient()``.
- ``vllmclient``: ``ClientvLLM(base_url=URL/v1, tokenizer=DIR, max_concurrency=64)``, ``load()``, then
  ``generate_outputs(inputs, max_new_tokens=16, progress=False)``. Reported as "skipped: <reason>" while
  ``from vllmclient import ClientvLLM`` does not work.
- ``vllmclient-chat`` (not run by default): the same with ``tokenizer=None``, the server's chat template,
  conversations packed through ``/v1/chat/completions/batch``; ``vllmclient-chat-single``: also
  ``pack_size=1``, one conversation per request to ``/v1/chat/completions``.

Only generation is timed (not imports, tokenizer load, input building or client construction); inside the
child ``resource.getrusage(RUSAGE_SELF)`` gives client CPU (user+sys) and peak RSS (whole child life).
The child reads the server's ``GET /stats`` just before and after the timed part, giving the server's CPU
µs per request and per prompt and its max requests/prompts in flight. With 2+ cores the clients are pinned
to core 0 and the server to core 1. Every figure is the median of ``--repeats`` runs (min-max), kinds
interleaved within each repeat. Chat-template rendering is inside the timed part for every kind.

``--stream-1m`` runs vllmclient alone on 1,000,000 inputs produced lazily by a generator and consumed from
``llm.aiter_generate(gen, max_new_tokens=16, progress=False)`` inside ``asyncio.run`` (outputs counted
and checked, not stored); target peak RSS < 500 MB. Its messages are shorter (5-10 words after the tag) to
keep the server side fast. Default 1 repeat there.

Tokenizer: ``vllmclient.tiny_model.build_tokenizer(tmpdir)`` when importable, else a throwaway byte-level
BPE (vocab 2000, Llama-3 special tokens and chat template) built here; the JSON says which.

Commands (from the repository root, with the dev venv)::

    /work/venv/bin/python benchmarks/run.py --repeats 3 --out /tmp/bench-0ms.json
    /work/venv/bin/python benchmarks/run.py --latency-ms 100 --repeats 3 --out /tmp/bench-100ms.json
    /work/venv/bin/python benchmarks/run.py --stream-1m --out /tmp/bench-stream.json
    /work/venv/bin/python benchmarks/run.py --kinds aiohttp,openai-aiohttp --n 500 --repeats 1   # quick look
    node benchmarks/fake_server.js --port 8000 --latency 100   # the server alone

With ``--latency-ms L`` the table also gives throughput against the ideal ``concurrency / L``
(target for vllmclient >= 0.95x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = str(HERE.parent)  # the work tree's vllmclient wins over an installed one, here and in the children
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
KINDS = ("aiohttp", "openai", "openai-aiohttp", "vllmclient")
CHAT_KINDS = ("vllmclient-chat", "vllmclient-chat-single")  # tokenizer=None: packed (/batch), or pack_size=1
STREAM_KIND = "vllmclient-stream"
Messages = list[dict[str, str]]
WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
    "his", "her", "they", "this", "are", "were", "which", "be", "an", "had", "not", "river", "mountain",
    "garden", "window", "letter", "engine", "market", "winter", "summer", "island", "silver", "forest",
    "harbor", "lantern", "compute", "signal", "vector", "matrix", "kernel", "buffer", "packet", "thread",
    "socket", "module", "parser", "render", "token", "batch", "queue", "quiet", "rapid", "bright", "narrow",
    "hollow", "gentle", "ancient", "modern", "simple", "careful", "honest", "sudden", "distant", "golden",
    "walk", "carry", "build", "write", "follow", "listen", "measure", "gather", "borrow", "explain",
    "imagine", "protect", "observe", "wander",
)


# ---------------------------------------------------------------- workload


def message(i: int, rng: random.Random, lo: int, hi: int) -> Messages:
    words = " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))
    return [{"role": "user", "content": f"[[q{i}]] {words}"}]


def make_inputs(n: int, seed: int, lo: int = 30, hi: int = 80) -> list[Messages]:
    rng = random.Random(seed)
    return [message(i, rng, lo, hi) for i in range(n)]


def tag_ok(i: int, out: Any) -> bool:
    return bool(out) and isinstance(out[0], str) and out[0].startswith(f"q{i} ")


def check(outs: list[Any], n: int) -> str:
    if len(outs) != n:
        return f"FAIL: {len(outs)} outputs for {n} inputs"
    bad = [i for i, o in enumerate(outs) if not tag_ok(i, o)]
    return f"FAIL: {len(bad)} wrong, first #{bad[0]}: {outs[bad[0]]!r:.80}" if bad else "ok"


# ---------------------------------------------------------------- child side


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read() or b"null")


class Timer:
    """Times the generation only: wall, getrusage CPU, and the server's /stats around it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.rec: dict[str, Any] = {}

    def start(self) -> None:
        self.s0 = get_json(f"{self.url}/stats?reset=1")
        self.r0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        wall = time.perf_counter() - self.t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        s1 = get_json(f"{self.url}/stats")
        cpu = (r1.ru_utime - self.r0.ru_utime) + (r1.ru_stime - self.r0.ru_stime)
        self.rec = {
            "wall_s": wall,
            "cpu_s": cpu,
            "server_cpu_s": (s1["cpu_us"] - self.s0["cpu_us"]) / 1e6,
            "server_requests": s1["requests"] - self.s0["requests"],
            "server_prompts": s1["prompts"] - self.s0["prompts"],
            "server_errors": s1["errors"] - self.s0["errors"],
            "max_inflight": s1["max_inflight"],
            "max_inflight_prompts": s1["max_inflight_prompts"],
        }


def load_hf_tokenizer(tokdir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokdir)


async def kind_aiohttp(a: argparse.Namespace, inputs: list[Messages], timer: Timer) -> list[list[str]]:
    import aiohttp

    tok = load_hf_tokenizer(a.tokenizer)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=a.concurrency)) as s:
        async with s.get(f"{a.url}/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        sem = asyncio.Semaphore(a.concurrency)

        async def one(msgs: Messages) -> list[str]:
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            body = {"model": model, "prompt": prompt, "max_tokens": a.max_tokens, "add_special_tokens": False}
            async with sem, s.post(f"{a.url}/v1/completions", json=body) as r:
                r.raise_for_status()
                data = await r.json()
            return [c["text"] for c in data["choices"]]

        timer.start()
        outs = await asyncio.gather(*(one(m) for m in inputs))
        timer.stop()
    return outs


async def kind_openai(a: argparse.Namespace, inputs: list[Messages], timer: Timer) -> list[list[str]]:
    import openai

    tok = load_hf_tokenizer(a.tokenizer)
    http_client = openai.DefaultAioHttpClient() if a.child == "openai-aiohttp" else None
    async with openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key="EMPTY", http_client=http_client) as client:
        model = (await client.models.list()).data[0].id
        sem = asyncio.Semaphore(a.concurrency)

        async def one(msgs: Messages) -> list[str]:
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            async with sem:
                r = await client.completions.create(
                    model=model, prompt=prompt, max_tokens=a.max_tokens, extra_body={"add_special_tokens": False}
                )
            return [c.text for c in r.choices]

        timer.start()
        outs = await asyncio.gather(*(one(m) for m in inputs))
        timer.stop()
    return outs


def new_vllmclient(a: argparse.Namespace) -> Any:
    from vllmclient import ClientvLLM

    chat = a.child in CHAT_KINDS
    llm = ClientvLLM(base_url=f"{a.url}/v1", tokenizer=None if chat else a.tokenizer, max_concurrency=a.concurrency,
                     pack_size=1 if a.child == "vllmclient-chat-single" else None)
    llm.load()
    return llm


def texts(out: Any) -> Any:
    return out["generations"] if isinstance(out, dict) else out  # tolerate GenerateOutput-style dicts


def kind_vllmclient(a: argparse.Namespace, inputs: list[Messages], timer: Timer) -> list[list[str]]:
    llm = new_vllmclient(a)
    timer.start()
    outs = llm.generate_outputs(inputs, max_new_tokens=a.max_tokens, progress=False)
    timer.stop()
    getattr(llm, "close", lambda: None)()
    return [texts(o) for o in outs]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def kind_stream(a: argparse.Namespace, timer: Timer) -> dict[str, Any]:
    llm = new_vllmclient(a)
    n, seen, bad, samples = a.n, bytearray(a.n), 0, []
    step = max(n // 10, 1)

    def gen() -> Iterator[Messages]:
        rng = random.Random(a.seed)
        for i in range(n):
            yield message(i, rng, 5, 10)

    async def consume() -> int:
        nonlocal bad
        count = 0
        async for idx, out in llm.aiter_generate(gen(), max_new_tokens=a.max_tokens, progress=False):
            if not 0 <= idx < n or seen[idx] or not tag_ok(idx, texts(out)):
                bad += 1
            else:
                seen[idx] = 1
            count += 1
            if count % step == 0:
                samples.append(round(rss_mb(), 1))
        return count

    timer.start()
    count = asyncio.run(consume())
    timer.stop()
    getattr(llm, "close", lambda: None)()
    ok = count == n and bad == 0 and all(seen)
    return {"check": "ok" if ok else f"FAIL: {count} outputs, {bad} wrong", "rss_mb_each_tenth": samples}


def warmup(a: argparse.Namespace) -> None:
    """Unrecorded requests to warm the server's JIT: single prompts, then packs of 16 with token ids."""
    import aiohttp

    async def go() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=a.concurrency)) as s:
            sem = asyncio.Semaphore(a.concurrency)

            async def one(i: int) -> None:
                prompt: str | list[str] = f"[[q{i}]] warm up"
                if i % 10 == 0:
                    prompt = [f"[[q{i}-{k}]] warm" for k in range(16)]
                body = {"prompt": prompt, "max_tokens": a.max_tokens, "return_token_ids": i % 20 == 0}
                async with sem, s.post(f"{a.url}/v1/completions", json=body) as r:
                    await r.read()

            await asyncio.gather(*(one(i) for i in range(a.n)))

    asyncio.run(go())


def child_main(a: argparse.Namespace) -> dict[str, Any]:
    timer = Timer(a.url)
    if a.child == "warmup":
        warmup(a)
        return {"check": "ok"}
    if a.child in ("vllmclient", STREAM_KIND, *CHAT_KINDS):
        try:
            from vllmclient import ClientvLLM  # noqa: F401
        except Exception as e:  # noqa: BLE001 - the package is being written: report, carry on
            return {"check": f"skipped: {type(e).__name__}: {e}"}
    extra: dict[str, Any] = {}
    if a.child == STREAM_KIND:
        extra = kind_stream(a, timer)
    else:
        inputs = make_inputs(a.n, a.seed)
        if a.child == "aiohttp":
            outs = asyncio.run(kind_aiohttp(a, inputs, timer))
        elif a.child in ("openai", "openai-aiohttp"):
            outs = asyncio.run(kind_openai(a, inputs, timer))
        else:
            outs = kind_vllmclient(a, inputs, timer)
        extra["check"] = check(outs, a.n)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {**timer.rec, **extra, "rss_mb": ru.ru_maxrss / 1024}


# ---------------------------------------------------------------- parent side


LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def build_tokenizer(tmp: str) -> tuple[str, str]:
    """(directory, source): vllmclient.tiny_model's tokenizer if available, else a throwaway one."""
    try:
        from vllmclient.tiny_model import build_tokenizer as build

        out = build(tmp)
        return str(out if isinstance(out, (str, Path)) else tmp), "vllmclient.tiny_model.build_tokenizer"
    except Exception as e:  # noqa: BLE001 - module absent or half-written: use a throwaway tokenizer
        reason = f"fallback ({type(e).__name__}: {e})"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    rng = random.Random(0)
    tk.train_from_iterator((" ".join(rng.choices(WORDS, k=50)) for _ in range(2000)), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=specials[0], eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE
    )
    fast.save_pretrained(tmp)
    return tmp, reason


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(core: int) -> None:
    """Pin this (single-threaded) process to `core`; the processes it spawns next inherit it."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {core})


def start_server(port: int, latency_ms: float) -> subprocess.Popen[bytes]:
    cmd = ["node", str(HERE / "fake_server.js"), "--port", str(port), "--latency", str(latency_ms)]
    pin(1)  # server on core 1, then this runner and the clients on core 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    pin(0)
    for _ in range(100):
        try:
            get_json(f"http://127.0.0.1:{port}/health")
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fake server did not start")


def run_child(a: argparse.Namespace, kind: str, url: str, tokdir: str, n: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--url", url, "--tokenizer", tokdir, "--n", str(n),
           "--seed", str(a.seed), "--concurrency", str(a.concurrency), "--max-tokens", str(a.max_tokens)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=a.timeout, env=env)
    try:
        return dict(json.loads(p.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        last = (p.stderr.strip().splitlines() or ["no output"])[-1][-200:].replace("|", "/")
        return {"check": f"FAIL: rc={p.returncode}: {last}", "stderr_tail": p.stderr[-3000:]}


def derive(rec: dict[str, Any], n: int) -> dict[str, Any]:
    if "wall_s" not in rec:
        return rec
    reqs, prompts = max(rec["server_requests"], 1), max(rec["server_prompts"], 1)
    return {**rec, "prompts_per_s": n / rec["wall_s"], "cpu_ms_per_prompt": 1e3 * rec["cpu_s"] / n,
            "server_us_per_req": 1e6 * rec["server_cpu_s"] / reqs,
            "server_us_per_prompt": 1e6 * rec["server_cpu_s"] / prompts}


METRICS = ("wall_s", "prompts_per_s", "cpu_ms_per_prompt", "rss_mb", "server_us_per_req", "server_us_per_prompt",
           "server_requests", "max_inflight", "max_inflight_prompts")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if "wall_s" in r]
    checks = sorted({r["check"] for r in runs})
    out: dict[str, Any] = {"check": "ok" if checks == ["ok"] else "; ".join(checks), "repeats": len(done)}
    for m in METRICS:
        vals = [r[m] for r in done]
        if vals:
            out[m] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"


def table(summary: dict[str, dict[str, Any]], n: int, latency_ms: float, concurrency: int) -> str:
    ideal = concurrency / (latency_ms / 1e3) if latency_ms > 0 else 0.0
    head = ["kind", "N", "wall s", "prompts/s", "client CPU ms/prompt", "peak RSS MB", "× aiohttp wall",
            "× aiohttp CPU", "× aiohttp RSS", "server µs/req", "server µs/prompt", "server reqs",
            "max in flight req (prompts)", "check"]
    if ideal:
        head.insert(4, f"× ideal {ideal:.0f}/s")  # concurrency / latency: the target for vllmclient is >= 0.95
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = summary.get("aiohttp", {})

    def med(s: dict[str, Any], m: str) -> float:
        return float(s[m]["median"])

    def rng(s: dict[str, Any], m: str) -> str:
        return f"{fmt(med(s, m))} ({fmt(s[m]['min'])}–{fmt(s[m]['max'])})"

    def ratio(s: dict[str, Any], m: str) -> str:
        return f"{med(s, m) / med(base, m):.2f}" if m in base and med(base, m) else ""

    for kind, s in summary.items():
        if "wall_s" not in s:
            lines.append("| " + " | ".join([kind, str(n)] + [""] * (len(head) - 3) + [s["check"].replace("|", "/")]) + " |")
            continue
        row = [kind, str(n), rng(s, "wall_s"), fmt(med(s, "prompts_per_s")), rng(s, "cpu_ms_per_prompt"),
               rng(s, "rss_mb"), ratio(s, "wall_s"), ratio(s, "cpu_ms_per_prompt"), ratio(s, "rss_mb"),
               fmt(med(s, "server_us_per_req")), fmt(med(s, "server_us_per_prompt")),
               fmt(med(s, "server_requests")),
               f"{med(s, 'max_inflight'):.0f} ({med(s, 'max_inflight_prompts'):.0f})", s["check"].replace("|", "/")]
        if ideal:
            row.insert(4, f"{med(s, 'prompts_per_s') / ideal:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "node": subprocess.run(
        ["node", "--version"], check=False, capture_output=True, text=True).stdout.strip()}
    for pkg in ("openai", "aiohttp", "httpx2", "transformers", "tokenizers", "pyvllmclient"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def parent_main(a: argparse.Namespace) -> None:
    kinds = [STREAM_KIND] if a.stream_1m else a.kinds.split(",")
    n = a.n or (1_000_000 if a.stream_1m else 3000)
    repeats = a.repeats or (1 if a.stream_1m else 3)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tokdir, tok_src = build_tokenizer(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(port, a.latency_ms)
        try:
            run_child(a, "warmup", url, tokdir, a.warmup)
            s0 = get_json(f"{url}/stats")
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
            for r in range(repeats):
                for kind in kinds:
                    if runs[kind] and runs[kind][-1]["check"].startswith("skipped"):
                        continue
                    rec = derive(run_child(a, kind, url, tokdir, n), n)
                    runs[kind].append(rec)
                    print(f"# repeat {r + 1}/{repeats} {kind}: " + ", ".join(
                        f"{k}={fmt(rec[k])}" for k in ("wall_s", "cpu_ms_per_prompt", "rss_mb") if k in rec)
                        + f" [{rec['check']}]", file=sys.stderr, flush=True)
            s1 = get_json(f"{url}/stats")
        finally:
            server.terminate()
            server.wait()
    summary = {k: summarize(v) for k, v in runs.items()}
    life_us = s1["cpu_us"] / max(s1["requests"], 1)
    print(f"\nN={n}, latency {a.latency_ms:g} ms, {a.concurrency} in flight, max_tokens {a.max_tokens}, "
          f"medians of {repeats} (min–max); tokenizer: {tok_src}\n")
    print(table(summary, n, a.latency_ms, a.concurrency))
    print(f"\nserver over its whole life (incl. start and {a.warmup} warm-up requests): {s1['requests']} requests, "
          f"{life_us:.0f} µs CPU/request; load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    if a.stream_1m and "rss_mb" in runs[STREAM_KIND][-1]:
        last = runs[STREAM_KIND][-1]
        verdict = "met" if last["rss_mb"] < 500 else "NOT met"
        print(f"RSS MB after each tenth of the outputs (last run): {last['rss_mb_each_tenth']}; "
              f"target peak < 500 MB {verdict}")
    if a.out:
        cfg = {k: v for k, v in vars(a).items() if k != "child"} | {"n": n, "repeats": repeats, "kinds": kinds}
        doc = {"config": cfg, "tokenizer": tok_src, "versions": versions(), "cpus": os.cpu_count(),
               "loadavg_before_after": [load0[0], os.getloadavg()[0]], "server_total": s1,
               "server_after_warmup": s0, "summary": summary, "runs": runs}
        Path(a.out).write_text(json.dumps(doc, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="comma-separated subset of " + ",".join(KINDS + CHAT_KINDS))
    p.add_argument("--n", type=int, default=0, help="inputs per run (default 3000; 1,000,000 with --stream-1m)")
    p.add_argument("--repeats", type=int, default=0, help="runs per kind (default 3; 1 with --stream-1m)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="fake server latency per request")
    p.add_argument("--stream-1m", action="store_true", help="vllmclient aiter_generate over 1M generated inputs")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--warmup", type=int, default=10_000, help="unrecorded server warm-up requests")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    p.add_argument("--out", help="write JSON results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child_main(a)))
    else:
        parent_main(a)


if __name__ == "__main__":
    main()
