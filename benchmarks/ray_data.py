"""Ray Data: vllmclient's integration against Ray's own ``HttpRequestProcessorConfig``, same fake server.

    .venv/bin/python benchmarks/ray_data.py [--n 2000] [--latency-ms 100] [--actors 2] [--repeats 1]

Needs the ``ray`` extra. Starts ``benchmarks/fake_server.js`` (Node) with ``--latency``, then, each kind in
a fresh process with its own ``ray.init(num_cpus=--ray-cpus)`` (default 2: each actor and each map task
takes one, so Ray's processor, whose preprocess and postprocess are tasks, is starved at 2; try 8), turns a dataset of ``--n`` chat rows (a system and a
user message each, ``max_tokens=16``) into results with 2 actors and checks every row's answer:

- ``vllmclient``: ``vllmclient.integrations.ray.generate`` (``AsyncGenerate``), the client-side chat
  template (packs of prompts to ``/v1/completions``), ``max_concurrency=256`` for the whole job;
- ``vllmclient-chat``: the same with ``tokenizer=None``: one ``/v1/chat/completions`` request per row, as Ray's;
- ``ray-http``: ``ray.data.llm.HttpRequestProcessorConfig(url=.../v1/chat/completions, batch_size=64,
  concurrency=2)`` with ``build_processor``: a preprocess building each row's payload, a postprocess taking
  the text.

Timed: the dataset's execution (``materialize``), actor start-up included, ``ray.init`` not. CPU: every
process under the benchmark's own (driver, Ray's daemons and workers), sampled every 0.2 s, per row; the
fake server's CPU is not counted. Also the server's maximum of requests and prompts in flight (``/stats``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

HERE = Path(__file__).resolve().parent
KINDS = ("vllmclient", "vllmclient-chat", "ray-http")


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "conversation": [{"role": "system", "content": "You are a helpful assistant."},
                                       {"role": "user", "content": f"[[r{i}]] Write a short story about item {i}."}]}
            for i in range(n)]


class TreeCPU:
    """CPU seconds of this process and all its descendants, dead ones counted up to their last sample."""

    def __init__(self) -> None:
        import psutil

        self._root = psutil.Process()
        self._last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self.start = self._sample()

    def _sample(self) -> float:
        import psutil

        for process in [self._root, *self._root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                self._last[(process.pid, process.create_time())] = times.user + times.system
            except psutil.Error:
                pass
        return sum(self._last.values())

    def _sample_loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self) -> Self:
        self.start = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = self._sample() - self.start


def child(kind: str, url: str, tokenizer: str, n: int, actors: int, cpus: int) -> dict[str, Any]:
    import ray
    import ray.data

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items(rows(n))
    if kind == "ray-http":
        from ray.data.llm import HttpRequestProcessorConfig, build_processor

        config = HttpRequestProcessorConfig(url=f"{url}/v1/chat/completions", batch_size=64, concurrency=actors)
        processor = build_processor(
            config,
            preprocess=lambda row: {"id": row["id"], "payload": {
                "model": "fake", "messages": [dict(m) for m in row["conversation"]], "max_tokens": 16}},
            postprocess=lambda row: {"id": row["id"], "text": row["http_response"]["choices"][0]["message"]["content"]},
        )
        results = processor(dataset)
    else:
        from vllmclient import ClientvLLM
        from vllmclient.integrations.ray import generate

        client = ClientvLLM(base_url=f"{url}/v1", tokenizer=None if kind == "vllmclient-chat" else tokenizer,
                            max_concurrency=256, tokenizer_check="off")
        results = generate(dataset, client, actors=actors, id_column="id", max_new_tokens=16).map_batches(
            lambda batch: {"id": batch["id"], "text": [g[0] if g is not None else None for g in batch["generations"]]})
    get_json(f"{url}/stats?reset=1")
    with TreeCPU() as cpu:
        start = time.perf_counter()
        done = results.materialize()
        wall = time.perf_counter() - start
    stats = get_json(f"{url}/stats")
    right = sum(1 for row in done.iter_rows() if (row["text"] or "").split(" ")[0] == f"r{row['id']}")
    ray.shutdown()
    return {"kind": kind, "rows": n, "right": right, "wall_s": wall, "cpu_s": cpu.seconds,
            "max_requests": stats.get("max_inflight"), "max_prompts": stats.get("max_inflight_prompts")}


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read() or b"null")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--ray-cpus", type=int, default=2, help="ray.init(num_cpus=...): logical CPUs to schedule")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--child", choices=KINDS)
    parser.add_argument("--url", default="")
    parser.add_argument("--tokenizer", default="")
    a = parser.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.url, a.tokenizer, a.n, a.actors, a.ray_cpus)))
        return
    from vllmclient.tiny_model import build_tokenizer

    server = subprocess.Popen(["node", str(HERE / "fake_server.js"), "--port", str(a.port), "--latency",
                               str(a.latency_ms)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{a.port}"
    try:
        for _ in range(100):
            try:
                get_json(f"{url}/health")
                break
            except OSError:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_tokenizer(tmp)
            env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
            print(f"{a.n} rows, {a.actors} actors, ray.init(num_cpus={a.ray_cpus}), fake server at {a.latency_ms:g} ms")
            print(f"{'kind':<16} {'rows/s':>8} {'CPU ms/row':>11} {'max requests':>13} {'max prompts':>12}  check")
            for _ in range(a.repeats):
                for kind in a.kinds.split(","):
                    cmd = [sys.executable, __file__, "--child", kind, "--url", url, "--tokenizer", str(tokenizer),
                           "--n", str(a.n), "--actors", str(a.actors), "--ray-cpus", str(a.ray_cpus)]
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
                    try:
                        r = json.loads(done.stdout.strip().splitlines()[-1])
                    except (IndexError, ValueError):
                        print(f"{kind:<16} FAILED: {done.stderr[-2000:]}")
                        continue
                    check = "ok" if r["right"] == r["rows"] else f"FAIL: {r['right']}/{r['rows']} right"
                    print(f"{kind:<16} {r['rows'] / r['wall_s']:>8.0f} {1000 * r['cpu_s'] / r['rows']:>11.2f} "
                          f"{r['max_requests']!s:>13} {r['max_prompts']!s:>12}  {check}", flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
