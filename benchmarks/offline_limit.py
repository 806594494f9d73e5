"""The limit: vLLM's offline engine against the same engine behind its HTTP server (issue 10, item 4).

In one run, with the same prompts and the same model: the offline engine (``vllm.LLM.generate``, in a
subprocess of the vLLM interpreter, given the prompts as token ids), then through the real server
(``vllmclient.LocalServer``, the embedded trained tiny model): vllmclient's defaults, vllmclient sending token
ids (``send_token_ids=True``), and a plain one-prompt-per-request ``openai.AsyncOpenAI`` loop. The workload:
``--n`` chat prompts (seeded English sentences, rendered with the model's chat template), greedy, with
max_tokens 8, 16, 32, 64 and 128 by turns (prompt ``i`` gets ``CAPS[i % 5]``), all at once (256 in flight).

The machine has 2 cores and the server shares them with the client, so nothing runs side by side: each
round measures every kind in turn (the offline engine while the server idles, and the other way round),
rounds are interleaved, and the table shows medians with the spread (min-max). Texts are compared with the
offline engine's (greedy: they should be identical). CPU per prompt: the client's (this process), the
front end's (the API server process, or the offline engine's own process: requests in, detokenized text out)
and the engine's (EngineCore and Worker processes), each read from /proc around each kind's run.

    .venv/bin/python benchmarks/offline_limit.py                      # 640 prompts, 3 rounds
    .venv/bin/python benchmarks/offline_limit.py --levers             # + pack size and concurrency settings
    .venv/bin/python benchmarks/offline_limit.py --server-args="--max-num-seqs 256 --max-num-batched-tokens 4096"
    .venv/bin/python benchmarks/offline_limit.py --max-tokens 1 --n 2000 --repeats 10 --no-plain   # the API's work

``--server-args`` go to ``vllm serve`` (LocalServer's extra_args); ``--offline-args`` (JSON) to ``vllm.LLM``:
the server's defaults on CPU are ``max_num_seqs=128, max_num_batched_tokens=2048`` while the offline
engine's are 256 and 4096, so both are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).parent))
from real_server import workload

from vllmclient import ChatFormatter, ClientvLLM, LocalServer
from vllmclient.local_server import SERVER_ENV, resolve_server_python

CAPS = (8, 16, 32, 64, 128)
OFFLINE = "offline engine (LLM.generate)"
DEFAULTS = "vllmclient defaults"
TOKEN_IDS = "vllmclient send_token_ids=True"

# Runs in the vLLM interpreter: builds the engine once, then answers "run" lines on stdin with one result file each.
_OFFLINE = r"""
import json, sys, time


def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    config = json.load(open(sys.argv[1]))
    llm = LLM(model=config["model"], dtype="bfloat16", max_model_len=config["max_model_len"], seed=0,
              enforce_eager=True, enable_chunked_prefill=False, **config["engine_args"])
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    print("OFFLINE-READY", scheduler.max_num_seqs, scheduler.max_num_batched_tokens, flush=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in config["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=cap) for cap in config["caps"]]
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, "texts": [o.outputs[0].text for o in outputs],
                  "tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}
        json.dump(result, open(config["result"], "w"))
        print("OFFLINE-DONE", flush=True)


if __name__ == "__main__":
    main()
"""


class Offline:
    """The offline engine in its own process, kept alive between rounds (its start costs ~30 s)."""

    def __init__(self, python: str, model: Path, prompts: list[list[int]], caps: list[int], engine_args: dict[str, Any],
                 max_model_len: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="offline-limit-"))
        config = {"model": str(model), "prompts": prompts, "caps": caps, "engine_args": engine_args,
                  "max_model_len": max_model_len, "result": str(self.dir / "result.json")}
        (self.dir / "config.json").write_text(json.dumps(config))
        (self.dir / "offline.py").write_text(_OFFLINE)
        env = {**os.environ, **SERVER_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.log = open(self.dir / "log.txt", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([python, str(self.dir / "offline.py"), str(self.dir / "config.json")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.limits = self._wait("OFFLINE-READY").split()[1:]

    def _wait(self, marker: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line
        raise SystemExit(f"the offline engine stopped; its log: {self.dir / 'log.txt'}")

    def run(self) -> tuple[float, int, list[str]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        self._wait("OFFLINE-DONE")
        result = json.loads((self.dir / "result.json").read_text())
        return result["seconds"], result["tokens"], result["texts"]

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


async def through_client(llm: ClientvLLM, conversations: list[Any], caps: list[int]) -> tuple[float, int, list[str]]:
    """One aiter_generate per max_tokens cap, all at once through one client (its capacity is shared)."""
    distinct = sorted(set(caps))
    groups = [[i for i, cap in enumerate(caps) if cap == wanted] for wanted in distinct]

    async def group(indices: list[int], cap: int) -> list[tuple[int, Any]]:
        chosen = [conversations[i] for i in indices]
        items = [item async for item in llm.aiter_generate(chosen, max_new_tokens=cap, temperature=0.0,
                                                         progress=False)]
        return [(indices[position], output) for position, output in items]

    start = time.perf_counter()
    parts = await asyncio.gather(*(group(indices, cap) for indices, cap in zip(groups, distinct, strict=True)))
    seconds = time.perf_counter() - start
    texts = [""] * len(conversations)
    tokens = 0
    for index, output in (item for part in parts for item in part):
        if "error" in output:
            raise SystemExit(f"input {index} failed: {output['error']}")
        texts[index] = output["generations"][0]
        tokens += output["statistics"]["output_tokens"][0]
    return seconds, tokens, texts


async def plain_loop(base_url: str, model: str, prompts: list[str], caps: list[int]) -> tuple[float, int, list[str]]:
    """What a user writes with the SDK: one prompt per request, 256 in flight."""
    limit = asyncio.Semaphore(256)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=600) as client:

        async def one(prompt: str, cap: int) -> tuple[str, int]:
            async with limit:
                answer = await client.completions.create(
                    model=model, prompt=prompt, max_tokens=cap, temperature=0.0,
                    extra_body={"add_special_tokens": False})  # the rendered template has its BOS
            assert answer.usage is not None
            return answer.choices[0].text, answer.usage.completion_tokens

        start = time.perf_counter()
        results = await asyncio.gather(*(one(p, c) for p, c in zip(prompts, caps, strict=True)))
        seconds = time.perf_counter() - start
    return seconds, sum(tokens for _, tokens in results), [text for text, _ in results]


def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds used so far by process ``pid`` and by all its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    below, frontier = 0.0, [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        below += sum(used[child] for child in children)
        frontier = children
    return used.get(pid, 0.0), below


def fmt(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server-args", default="", help="extra arguments for the vLLM server, as one string")
    parser.add_argument("--offline-args", default="{}", help="extra vllm.LLM arguments, as JSON")
    parser.add_argument("--levers", action="store_true", help="also max_concurrency 512 (text and ids), pack_size 64")
    parser.add_argument("--max-tokens", type=int, help="one max_tokens for every prompt (1: the API process's work alone)")
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain AsyncOpenAI loop")
    parser.add_argument("--pack-sizes", default="", help="also vllmclient with these pack_size values (comma-separated)")
    args = parser.parse_args()

    conversations = workload(args.n)
    caps = [args.max_tokens or CAPS[i % len(CAPS)] for i in range(args.n)]
    python = resolve_server_python()
    with LocalServer(python=python, extra_args=shlex.split(args.server_args)) as server:
        assert server.model_dir is not None
        formatter = ChatFormatter.from_pretrained(server.model_dir)
        prompts = [formatter.render(conversation) for conversation in conversations]
        offline = Offline(python, server.model_dir, [formatter.encode(prompt) for prompt in prompts], caps,
                          json.loads(args.offline_args), server.max_model_len)
        common = {"base_url": server.base_url, "tokenizer": str(server.model_dir), "timeout": 600}
        settings: dict[str, dict[str, Any]] = {DEFAULTS: {}, TOKEN_IDS: {"send_token_ids": True}}
        if args.levers:
            settings["vllmclient max_concurrency=512"] = {"max_concurrency": 512}
            settings["vllmclient max_concurrency=512, send_token_ids"] = {"max_concurrency": 512, "send_token_ids": True}
            settings["vllmclient pack_size=64"] = {"pack_size": 64}
        for size in filter(None, args.pack_sizes.split(",")):
            settings[f"vllmclient pack_size={size}"] = {"pack_size": int(size)}
        clients = {name: ClientvLLM(**common, **extra) for name, extra in settings.items()}
        for llm in clients.values():
            llm.load()
        kinds: dict[str, Callable[[], tuple[float, int, list[str]]]] = {OFFLINE: offline.run}
        for name, llm in clients.items():
            kinds[name] = lambda llm=llm: asyncio.run(through_client(llm, conversations, caps))
        if not args.no_plain:
            kinds["plain AsyncOpenAI loop"] = lambda: asyncio.run(
                plain_loop(server.base_url, server.served_model_name, prompts, caps))
        for kind in kinds.values():  # warm-up: the server's first requests and the engines' first steps are slow
            kind()
        rates: dict[str, list[float]] = {name: [] for name in kinds}
        cpu: dict[str, list[float]] = {name: [] for name in kinds}
        front_cpu: dict[str, list[float]] = {name: [] for name in kinds}  # the API server / LLM's own process
        engine_cpu: dict[str, list[float]] = {name: [] for name in kinds}  # EngineCore and Worker processes
        texts: dict[str, list[str]] = {}
        changed: dict[str, int] = dict.fromkeys(kinds, 0)
        assert server.pid is not None
        pids = {"server": server.pid, "offline": offline.proc.pid}
        for _ in range(args.repeats):
            for name, kind in kinds.items():
                owner = pids["offline" if name == OFFLINE else "server"]
                before, front, back = time.process_time(), *tree_cpu(owner)
                seconds, _tokens, got = kind()
                cpu[name].append((time.process_time() - before) / args.n * 1000)
                after_front, after_back = tree_cpu(owner)
                front_cpu[name].append((after_front - front) / args.n * 1000)
                engine_cpu[name].append((after_back - back) / args.n * 1000)
                rates[name].append(args.n / seconds)
                changed[name] += name in texts and got != texts[name]
                texts.setdefault(name, got)
        offline.stop()
        for llm in clients.values():
            llm.close()
    reference = texts[OFFLINE]
    print(f"\nreal vLLM (vllm-cpu, tiny model), {args.n} chat prompts, greedy, max_tokens "
          f"{args.max_tokens or CAPS}{'' if args.max_tokens else ' by turns'}, "
          f"medians of {args.repeats} interleaved rounds (min-max)")
    print(f"server args: {args.server_args or '(LocalServer defaults)'}; offline engine: max_num_seqs, "
          f"max_num_batched_tokens = {', '.join(offline.limits)}\n")
    print("| kind | prompts/s | x offline (same round) | client CPU ms/prompt | front-end CPU ms/prompt | "
          "engine CPU ms/prompt | texts equal to the offline engine's |")
    print("|---|---|---|---|---|---|---|")
    for name in kinds:
        same = sum(a == b for a, b in zip(texts[name], reference, strict=True))
        note = f"; changed on a repeat {changed[name]}x" if changed[name] else ""
        client_cpu = "-" if name.startswith("offline") else fmt(cpu[name], 2)
        ratios = [rate / offline_rate for rate, offline_rate in zip(rates[name], rates[OFFLINE], strict=True)]
        print(f"| {name} | {fmt(rates[name])} | {fmt(ratios, 2)} | {client_cpu} | {fmt(front_cpu[name], 2)} | "
              f"{fmt(engine_cpu[name], 2)} | {same}/{len(reference)}{note} |")
    print("\nprompts/s by round:")
    for name in kinds:
        print(f"  {name}: {' '.join(f'{rate:.0f}' for rate in rates[name])}")
    ids, text = rates[TOKEN_IDS], rates[DEFAULTS]
    paired = [a / b for a, b in zip(ids, text, strict=True)]
    print(f"token ids / text, same round: {fmt(paired, 2)}; faster in {sum(r > 1 for r in paired)} of {len(paired)} rounds")


if __name__ == "__main__":
    main()
