"""Job files against generate(): the same N chat inputs through ``generate_outputs`` (a list in memory) and through
``run_batch_file`` (a JSON-lines file in, run_batch records out, flushed as they finish), on the Node fake server.

Each kind runs in its own subprocess; timed: the generation only (the client already loaded for
``generate``; for ``run_batch_file`` the whole call: fingerprinting, grouping, sending, writing). ``cli`` is the
wall time of the whole ``python -m vllmclient run`` command, start-up included. Medians of ``--repeats``.

    .venv/bin/python benchmarks/jobs.py --n 10000
    .venv/bin/python benchmarks/jobs.py --n 10000 --latency-ms 100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from run import make_inputs, start_server  # benchmarks/run.py


def child(kind: str, url: str, tokenizer: str, source: Path, concurrency: int, max_tokens: int) -> dict[str, Any]:
    from vllmclient import ClientvLLM, run_batch_file

    inputs = [json.loads(line)["messages"] for line in source.read_text().splitlines()]
    with ClientvLLM(base_url=url, tokenizer=tokenizer, max_concurrency=concurrency) as llm:
        started = time.perf_counter()
        if kind == "generate":
            texts = llm.generate_outputs(inputs, max_new_tokens=max_tokens, progress=False)
            ok = len(texts) == len(inputs) and all(t[0] is not None for t in texts)
        else:
            out = source.with_suffix(".out.jsonl")
            summary = run_batch_file(llm, source, out, progress=False, max_new_tokens=max_tokens)
            ok = summary.done == len(inputs) and out.read_text().count("\n") == len(inputs)
        wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "ok": ok}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=5, metavar=("KIND", "URL", "TOKENIZER", "SOURCE", "CONCURRENCY"))
    args = parser.parse_args()
    if args.child:
        kind, url, tokenizer, source, concurrency = args.child
        print(json.dumps(child(kind, url, tokenizer, Path(source), int(concurrency), args.max_tokens)))
        return
    from vllmclient.tiny_model import build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    tokenizer = build_tokenizer(work / "tokenizer")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(port, args.latency_ms)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict[str, Any]]] = {"generate": [], "run_batch_file": [], "cli": []}
    try:
        for repeat in range(args.repeats):
            source = work / f"in-{repeat}.jsonl"
            source.write_text("".join(json.dumps({"custom_id": f"q{i}", "messages": messages}) + "\n"
                                      for i, messages in enumerate(make_inputs(args.n, seed=repeat))))
            for kind in ("generate", "run_batch_file"):
                command = [sys.executable, __file__, "--max-tokens", str(args.max_tokens), "--child", kind, url,
                           str(tokenizer), str(source), str(args.concurrency)]
                done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
                results[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
            out = work / f"cli-{repeat}.jsonl"
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vllmclient", "run", str(source), "-o", str(out), "--base-url", url,
                            "--tokenizer", str(tokenizer), "--max-tokens", str(args.max_tokens), "--no-progress",
                            "--max-concurrency", str(args.concurrency)], check=True, env=env, cwd=ROOT,
                           capture_output=True)
            ok = out.read_text().count("\n") == args.n
            results["cli"].append({"wall_s": time.perf_counter() - started, "cpu_s": float("nan"), "ok": ok})
    finally:
        server.kill()
    print(f"{args.n} chat inputs, max_tokens {args.max_tokens}, {args.concurrency} in flight, "
          f"latency {args.latency_ms:g} ms; medians of {args.repeats}")
    for kind, runs in results.items():
        wall = statistics.median(run["wall_s"] for run in runs)
        cpu = statistics.median(run["cpu_s"] for run in runs)
        checks = "ok" if all(run["ok"] for run in runs) else "FAIL"
        print(f"  {kind:15s} {args.n / wall:8.0f} prompts/s  {wall:6.2f} s  CPU {cpu:6.2f} s  {checks}")


if __name__ == "__main__":
    main()
