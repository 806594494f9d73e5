"""Replica benchmark: one client over two servers of fixed capacity against the same client over one.

Each server is ``benchmarks/fake_server.js`` with ``--max-num-seqs S --latency L``: it works on at most S
sequences at once, each answered L ms after it is taken up, so one server gives at most S / L prompts/s
however many requests it gets. The client is ``ClientvLLM(base_url=[...], max_concurrency=S x replicas)``
(each replica's share is then S) and runs ``generate_outputs`` over N chat inputs rendered with the tiny
tokenizer's template; every output is checked against its input's tag. The 1-replica and the 2-replica
runs alternate within each repeat (side by side, same machine state); figures are medians over repeats.
Target: 2 replicas give >= 1.8x the prompts/s of one. On a loaded shared machine single runs vary (the client
and the servers share the cores); ``--latency-ms 100`` needs twice the client's rate and varies more.

``--busy-first`` adds another client's load to the first server (as a shared server has): a background
process keeps B sequences queued there; the figures then show how the split of the work reacts to it.

``--kill-second`` instead runs one job over two servers and kills the second when it has answered a third of
the inputs (SIGKILL: connections reset, new ones refused): it prints the job's prompts/s, whether every
output answers its input, and how the prompts were split, for ``max_retries`` 0 and the default 6.

Command (from the repository root)::

    .venv/bin/python benchmarks/replicas.py                  # N=3000, S=32, L=200 ms, 3 repeats
    .venv/bin/python benchmarks/replicas.py --n 1000 --repeats 1   # a quick look
    .venv/bin/python benchmarks/replicas.py --kill-second          # one server dies mid-job
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vllmclient import ClientvLLM
from vllmclient.tiny_model import build_tokenizer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(seqs: int, latency_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = ["node", str(HERE / "fake_server.js"), "--port", str(port), "--latency", str(latency_ms),
               "--max-num-seqs", str(seqs)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/health", timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the fake server on port {port} did not start")


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/stats?reset=1", timeout=5) as answer:
        return dict(json.load(answer))


def inputs(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"[[q{i}]] write one sentence about item {i}"}] for i in range(n)]


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(urls: list[str], tokenizer: str, seqs: int, n: int, max_retries: int = 0) -> tuple[float, list[int], float]:
    """prompts/s of one generate over ``urls``, the prompts each server answered, the client's CPU s."""
    with ClientvLLM(base_url=urls, tokenizer=tokenizer, tokenizer_check="off", max_concurrency=seqs * len(urls),
                    max_retries=max_retries) as llm:
        before = [stats(url)["prompts"] for url in urls]
        prompts = inputs(n)
        start, used = time.perf_counter(), cpu()
        outputs = llm.generate_outputs(prompts, max_new_tokens=16, progress=False)
        seconds, used = time.perf_counter() - start, cpu() - used
    bad = [i for i, texts in enumerate(outputs) if not texts[0] or not texts[0].startswith(f"q{i}")]
    if bad:
        raise SystemExit(f"FAIL: {len(bad)} outputs do not answer their input (first: {bad[0]})")
    served = []
    for url, count in zip(urls, before, strict=True):
        try:
            served.append(stats(url)["prompts"] - count)
        except OSError:  # killed
            served.append(-1)
    return n / seconds, served, used


def kill_second(args: argparse.Namespace, tokenizer: str) -> None:
    """One job over two servers; the second is killed once it answered a third of the inputs."""
    for max_retries in (0, 6):
        servers = [start_server(args.max_num_seqs, args.latency_ms) for _ in range(2)]
        urls = [url for _, url in servers]
        killed: list[int] = []

        def killer(victim: subprocess.Popen[bytes] = servers[1][0], url: str = urls[1],
                   killed: list[int] = killed) -> None:
            while stats(url)["prompts"] < args.n // 3:
                time.sleep(0.01)
            answered = stats(url)["prompts"]
            victim.kill()
            killed.append(answered)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            rate, served, _ = run(urls, tokenizer, args.max_num_seqs, args.n, max_retries)
        finally:
            for process, _ in servers:
                process.kill()
        print(f"max_retries={max_retries}: second server killed after answering {killed[0] if killed else '?'} "
              f"prompts; job {rate:.1f} prompts/s, every output answers its input; first server answered "
              f"{served[0]} of {args.n}")


def busy(url: str, sequences: int) -> subprocess.Popen[bytes]:
    """Another client keeping ``sequences`` one-prompt requests in flight at ``url``, until killed."""
    code = f"""
import asyncio, aiohttp
async def main():
    async with aiohttp.ClientSession() as session:
        async def loop():
            while True:
                async with session.post("{url}/v1/completions",
                                        json={{"model": "fake-model", "prompt": "x", "max_tokens": 16}}) as r:
                    await r.read()
        await asyncio.gather(*(loop() for _ in range({sequences})))
asyncio.run(main())
"""
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="inputs per run")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="each server's capacity (sequences at once)")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="each sequence's time on the server")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy-first", type=int, default=0, help="another client's sequences kept on server 1")
    parser.add_argument("--kill-second", action="store_true", help="kill the second server a third into one job")
    args = parser.parse_args()
    if args.kill_second:
        with tempfile.TemporaryDirectory() as tmp:
            kill_second(args, str(build_tokenizer(Path(tmp))))
        return
    servers = [start_server(args.max_num_seqs, args.latency_ms) for _ in range(2)]
    urls = [url for _, url in servers]
    other = busy(urls[0], args.busy_first) if args.busy_first else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = str(build_tokenizer(Path(tmp)))
            run(urls, tokenizer, args.max_num_seqs, 200)  # warm-up: imports, template, connections
            rates: dict[int, list[float]] = {1: [], 2: []}
            cpus: dict[int, list[float]] = {1: [], 2: []}
            split: list[list[int]] = []
            for _ in range(args.repeats):
                for replicas in (1, 2):
                    rate, served, used = run(urls[:replicas], tokenizer, args.max_num_seqs, args.n)
                    rates[replicas].append(rate)
                    cpus[replicas].append(used)
                    if replicas == 2:
                        split.append(served)
    finally:
        if other is not None:
            other.kill()
        for process, _ in servers:
            process.kill()
    ideal = args.max_num_seqs / (args.latency_ms / 1000)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"servers: max-num-seqs={args.max_num_seqs}, latency={args.latency_ms:g} ms (at most {ideal:.0f} prompts/s "
          f"each); N={args.n}, {args.repeats} repeats" + (f"; {args.busy_first} other sequences on server 1"
                                                           if args.busy_first else ""))
    for replicas, rate in ((1, one), (2, two)):
        print(f"{replicas} replica{'s' if replicas > 1 else ' '}: {rate:7.1f} prompts/s  (runs: "
              f"{', '.join(f'{r:.1f}' for r in rates[replicas])}; client CPU "
              f"{1000 * statistics.median(cpus[replicas]) / args.n:.2f} ms/prompt)")
    pairs = ", ".join(f"{b / a:.2f}" for a, b in zip(rates[1], rates[2], strict=True))
    print(f"ratio     : {two / one:.2f}x  (target >= 1.8x; per repeat: {pairs})   prompts per server with 2: {split}")


if __name__ == "__main__":
    main()
