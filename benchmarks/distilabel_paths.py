"""Which path should the distilabel integration's ``generate`` take? Prints wall time per path.

- ``bulk``: the integration's ``generate`` (vllmclient's bulk run: prompts packed into few requests,
  bounded by ``max_concurrency``);
- ``per-input``: distilabel's own ``AsyncLLM.generate`` (one ``agenerate`` task per input, gathered),
  each ``agenerate`` going through vllmclient's per-input path (one request per input, same capacity).

Against ``benchmarks/fake_server.js`` (Node, cheap per request), N chat inputs of 30-80 words,
``max_new_tokens=16``, default ``max_concurrency``; the median of ``--repeats`` runs, paths interleaved.
Needs distilabel (``pip install -e '.[distilabel]'``)::

    python benchmarks/distilabel_paths.py --n 500 --repeats 5 [--latency-ms 0]
"""

from __future__ import annotations

import argparse
import logging
import random
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("vllmclient").setLevel(logging.ERROR)
    from distilabel.models.llms.base import AsyncLLM

    from vllmclient.integrations.distilabel import ClientvLLM
    from vllmclient.tiny_model import build_tokenizer

    port = _free_port()
    server = subprocess.Popen(["node", str(HERE / "fake_server.js"), "--port", str(port), "--latency",
                               str(args.latency_ms)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        rng = random.Random(0)
        words = ["cat", "tree", "river", "blue", "runs", "quickly", "over", "the", "small", "house"]
        inputs = [[{"role": "user", "content": f"[[q{i}]] " + " ".join(rng.choices(words, k=rng.randint(30, 80)))}]
                  for i in range(args.n)]
        with tempfile.TemporaryDirectory() as tmp:
            llm = ClientvLLM(base_url=f"http://127.0.0.1:{port}/v1", tokenizer=build_tokenizer(Path(tmp)),
                             tokenizer_check="off")
            llm.load()
            paths = {"bulk": llm.generate, "per-input": lambda inputs, **kw: AsyncLLM.generate(llm, inputs, **kw)}
            times: dict[str, list[float]] = {name: [] for name in paths}
            for generate in paths.values():  # warm-up
                generate(inputs[:50], max_new_tokens=16)
            for _ in range(args.repeats):
                for name, generate in paths.items():
                    start = time.perf_counter()
                    outputs = generate(inputs, max_new_tokens=16)
                    times[name].append(time.perf_counter() - start)
                    assert len(outputs) == args.n and all(o["generations"][0] for o in outputs), name
            llm.unload()
    finally:
        server.terminate()
        server.wait()
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:10s} N={args.n} latency={args.latency_ms:g} ms: median {median:.3f} s "
              f"({args.n / median:,.0f} inputs/s; min {min(values):.3f}, max {max(values):.3f})")


if __name__ == "__main__":
    main()
