"""The main job in miniature: start a local vLLM server, generate with ClientvLLM, print, stop.

    .venv/bin/python examples/quickstart.py            # after scripts/setup.sh (or: bash scripts/quickstart.sh)

The server runs the embedded tiny model (built on first use, ~1 min); point ClientvLLM at your own
``vllm serve`` instead with ``base_url=`` and ``tokenizer=``.
"""

from __future__ import annotations

import time

from vllmclient import ClientvLLM, LocalServer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Tell me about the river near the old house."}],
    [{"role": "user", "content": "What does the small bird find in the garden?"}],
]


def main() -> None:
    started = time.perf_counter()
    with LocalServer() as server:
        print(f"vLLM server ready at {server.base_url} in {time.perf_counter() - started:.0f} s")
        with ClientvLLM(base_url=server.base_url, tokenizer=str(server.model_dir)) as llm:
            outputs = llm.generate(CONVERSATIONS, num_generations=2, max_new_tokens=64, temperature=0.8, seed=1)
    for conversation, output in zip(CONVERSATIONS, outputs, strict=True):
        print(f"\n> {conversation[-1]['content']}")
        for text, reason, tokens in zip(output["generations"], output["finish_reasons"],
                                        output["statistics"]["output_tokens"], strict=True):
            print(f"  - {text!r}  ({tokens} tokens, {reason})")
    print(f"\ndone in {time.perf_counter() - started:.0f} s; the server is stopped")


if __name__ == "__main__":
    main()
