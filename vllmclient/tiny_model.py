"""Offline, deterministic builder of a tiny Llama-3-style model for tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on generated
English and chat text, and the model is a very small ``LlamaForCausalLM``
trained for a few hundred steps on the same kind of text, so that a real vLLM
server can serve it on a CPU in seconds and its assistant turns end with
``<|eot_id|>`` (``finish_reason == "stop"``).

The module imports only the standard library at top level and uses no relative
imports, because the server launcher runs it *by file path* with the vLLM
venv's interpreter (the only one with torch)::

    /path/to/.venv-vllm/bin/python vllmclient/tiny_model.py OUT [--train-steps N]
    python -m vllmclient.tiny_model OUT --tokenizer-only

``build_tokenizer`` needs only ``tokenizers``; ``build_model`` needs ``torch``,
``transformers`` and ``safetensors``. Two builds with the same arguments write
byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("vllmclient.tiny_model")

#: Bump when the generated data, tokenizer or model layout changes on purpose.
BUILDER_VERSION = "1"
#: Name the launcher serves the default tiny model under.
DEFAULT_SERVED_NAME = "tiny-llama"
DEFAULT_TRAIN_STEPS = 300
#: Target vocab size of the BPE part (the trainer may stop earlier).
BPE_VOCAB_SIZE = 1400

# Special tokens laid out as in Llama 3 (ids 128000.. there, right after the
# BPE vocab here). Only a few reserved slots are kept to stay tiny.
BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    START_HEADER,
    END_HEADER,
    "<|reserved_special_token_4|>",
    EOT,
)

# Llama 3's pre-tokenizer split pattern (tiktoken cl100k-style).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Llama-3-Instruct-style template without the date/tools preamble. Any role
#: is rendered (like Llama 3); ``add_generation_prompt`` opens the assistant
#: header.
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {{- (message['content'] or '') | trim }}\n"
    "    {{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# ----------------------------------------------------------------------------
# Deterministic text generator
# ----------------------------------------------------------------------------

_NAMES = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris",
    "Jack", "Lena", "Max", "Nora", "Oscar", "Paula", "Sam", "Tom", "Vera",
)
_NOUNS = (
    "cat", "dog", "bird", "horse", "fish", "teacher", "farmer", "doctor",
    "child", "baker", "friend", "neighbor", "student", "driver", "painter",
)
_THINGS = (
    "ball", "book", "house", "tree", "train", "river", "garden", "box",
    "letter", "window", "door", "car", "apple", "cake", "boat", "song",
    "picture", "road", "field", "bridge", "hat", "lamp", "cup", "chair",
    "flower", "map", "kite", "bike", "shell", "stone",
)
_ADJECTIVES = (
    "red", "blue", "green", "big", "small", "old", "new", "fast", "slow",
    "quiet", "happy", "bright", "dark", "warm", "cold", "open", "tiny",
    "heavy", "soft", "clean", "yellow", "long", "round", "funny",
)
_VERBS = (
    ("sees", "see"), ("likes", "like"), ("finds", "find"),
    ("follows", "follow"), ("watches", "watch"), ("carries", "carry"),
    ("paints", "paint"), ("builds", "build"), ("reads", "read"),
    ("visits", "visit"), ("cleans", "clean"), ("opens", "open"),
    ("draws", "draw"), ("wants", "want"), ("buys", "buy"), ("makes", "make"),
    ("brings", "bring"), ("loves", "love"),
)
_PLACES = (
    "in the park", "at home", "near the river", "by the sea", "in the garden",
    "at school", "in the city", "on the hill", "in the kitchen",
    "at the market", "in the forest", "on the farm",
)
_TIMES = (
    "today", "every morning", "in the morning", "at night", "again",
    "on Sunday", "after lunch", "before dinner", "this week", "last year",
    "in the evening", "every day",
)
_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer in one short sentence.",
    "You are a kind teacher who writes simple sentences.",
)


class _TextGen:
    """Seeded generator of simple English sentences and chat conversations."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def subject(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            return self.rng.choice(_NAMES)
        det = self.rng.choice(("the", "the", "my", "our", "a"))
        if self.rng.random() < 0.3:
            return f"{det} {self.rng.choice(_ADJECTIVES)} {self.rng.choice(_NOUNS)}"
        return f"{det} {self.rng.choice(_NOUNS)}"

    def thing(self) -> str:
        det = self.rng.choice(("the", "a", "the", "her", "his"))
        if det == "a" and self.rng.random() < 0.5:
            return f"a {self.rng.choice(_THINGS)}"
        return f"{det} {self.rng.choice(_ADJECTIVES)} {self.rng.choice(_THINGS)}"

    def sentence(self, subject: str | None = None) -> str:
        rng = self.rng
        subj = subject or self.subject()
        kind = rng.random()
        if kind < 0.12:
            n = rng.randint(2, 999)
            words = f"{subj} has {n} {rng.choice(_THINGS)}s"
        elif kind < 0.2:
            words = f"{subj} is {rng.choice(_ADJECTIVES)} {rng.choice(_TIMES)}"
        else:
            words = f"{subj} {rng.choice(_VERBS)[0]} {self.thing()}"
            if rng.random() < 0.5:
                words += f" {rng.choice(_PLACES)}"
            if rng.random() < 0.4:
                words += f" {rng.choice(_TIMES)}"
        return words[0].upper() + words[1:] + "."

    def paragraph(self, n: int) -> str:
        return " ".join(self.sentence() for _ in range(n))

    def exchange(self) -> tuple[str, str]:
        """One (user, assistant) turn pair whose answer fits the question."""
        rng = self.rng
        kind = rng.randrange(7)
        if kind == 0:
            subj = self.subject()
            return f"Tell me about {subj}.", self.sentence(subj)
        if kind == 1:
            name = rng.choice(_NAMES)
            verb = rng.choice(_VERBS)
            return (
                f"What does {name} {verb[1]}?",
                f"{name} {verb[0]} {self.thing()}.",
            )
        if kind == 2:
            thing = rng.choice(_THINGS)
            return (
                f"Where is the {thing}?",
                f"The {thing} is {rng.choice(_PLACES)}.",
            )
        if kind == 3:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        if kind == 4:
            return "Say hello.", rng.choice(
                ("Hello! How can I help you today?", "Hello there!", "Hi! Nice to meet you.")
            )
        if kind == 5:
            n = rng.randint(2, 3)
            return f"Write {n} sentences.", self.paragraph(n)
        return "Write a sentence.", self.sentence()

    def conversation(self) -> list[dict[str, str]]:
        messages: list[dict[str, str]] = []
        if self.rng.random() < 0.3:
            messages.append({"role": "system", "content": self.rng.choice(_SYSTEM_PROMPTS)})
        for _ in range(self.rng.choice((1, 1, 1, 2))):
            user, assistant = self.exchange()
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        return messages


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render messages exactly like ``CHAT_TEMPLATE`` does (no jinja needed)."""
    parts = [BOS]
    for message in messages:
        parts.append(f"{START_HEADER}{message['role']}{END_HEADER}\n\n")
        parts.append((message.get("content") or "").strip())
        parts.append(EOT)
    if add_generation_prompt:
        parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


def _bpe_corpus(seed: int) -> Iterator[str]:
    """Plain text the BPE is trained on: sentences, chat contents, role names."""
    gen = _TextGen(seed)
    for _ in range(1500):
        yield gen.paragraph(gen.rng.randint(1, 4))
    for _ in range(1500):
        for message in gen.conversation():
            yield f"{message['role']}\n\n{message['content']}"
    # Every number 0..999, so digit groups get merges (vocab size headroom).
    yield " ".join(str(i) for i in range(1000))


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n", "utf-8")


def build_tokenizer(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Train the byte-level BPE tokenizer and save it loadable by ``AutoTokenizer``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template
    inline, for transformers 4.x and 5.x), ``special_tokens_map.json`` and
    ``chat_template.jinja``. Deterministic and fast (well under a second of
    training), so test fixtures can call it freely.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()  # takes no options (any given are ignored)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(list(_bpe_corpus(seed)), trainer=trainer)
    # Specials go after the BPE vocab, as in Llama 3.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0",
            pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
            special_tokens=[(BOS, bos_id)],
        ),
    ])
    tok.save(str(out / "tokenizer.json"), pretty=True)

    added_tokens_decoder = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    _write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOT})
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, "utf-8")
    logger.info("tokenizer with %d tokens written to %s", tok.get_vocab_size(), out)
    return out


def special_token_ids(tokenizer_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Ids of the special tokens in a built tokenizer (read from tokenizer.json)."""
    data = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text("utf-8"))
    return {t["content"]: t["id"] for t in data["added_tokens"]}


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

def _training_stream(tokenizer_dir: Path, seed: int, n_docs: int) -> list[int]:
    """Token ids of packed training documents: chats and plain paragraphs.

    Chats end each turn with ``<|eot_id|>``; plain paragraphs end with
    ``<|end_of_text|>``, so the model learns both stop tokens.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    gen = _TextGen(seed + 1)
    texts: list[str] = []
    for _ in range(n_docs):
        if gen.rng.random() < 0.7:
            texts.append(render_chat(gen.conversation()))
        else:
            texts.append(BOS + gen.paragraph(gen.rng.randint(1, 4)) + END_OF_TEXT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
    return ids


def build_model(
    out_dir: str | os.PathLike[str],
    train_steps: int = DEFAULT_TRAIN_STEPS,
    seed: int = 0,
) -> Path:
    """Build the tokenizer and a tiny trained ``LlamaForCausalLM`` into ``out_dir``.

    hidden 64, 2 layers, 4 heads with head_dim 32 (vLLM's CPU attention rejects
    16), 2 KV heads, intermediate 128. Training is seeded and single-threaded so
    the saved safetensors are byte-identical across runs on one machine.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    out = Path(out_dir)
    build_tokenizer(out, seed=seed)
    ids = special_token_ids(out)
    vocab_size = max(ids.values()) + 1

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOT], ids[END_OF_TEXT]],
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)

    if train_steps > 0:
        seq_len, batch = 128, 16
        stream = torch.tensor(_training_stream(out, seed, n_docs=6000), dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optim, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / train_steps)
        )
        model.train()
        for step in range(train_steps):
            starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
            x = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            if step % 50 == 0 or step == train_steps - 1:
                logger.info("step %d/%d loss %.3f", step + 1, train_steps, loss.item())
        model.eval()

    model.save_pretrained(out, safe_serialization=True)
    # Only token ids: vLLM turns sampling fields found here into request defaults.
    GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOT], ids[END_OF_TEXT]],
    ).save_pretrained(out)
    logger.info("model built in %.1f s: %s", time.monotonic() - started, out)
    return out


# ----------------------------------------------------------------------------
# Cache location
# ----------------------------------------------------------------------------

def model_version_tag(train_steps: int = DEFAULT_TRAIN_STEPS) -> str:
    """Tag naming a build: changes when this file or the step count changes."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]
    return f"v{BUILDER_VERSION}-s{train_steps}-{digest}"


def default_model_dir(train_steps: int = DEFAULT_TRAIN_STEPS) -> Path:
    """Where the launcher keeps the embedded default model.

    ``$VLLMCLIENT_CACHE`` if set, else ``$XDG_CACHE_HOME/vllmclient`` (or
    ``~/.cache/vllmclient``); the folder name carries the version tag so a
    changed builder never reuses a stale model.
    """
    root = os.environ.get("VLLMCLIENT_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "vllmclient"
    return base / f"tiny-llama-{model_version_tag(train_steps)}"


def main(argv: list[str] | None = None) -> int:
    """CLI: ``tiny_model.py OUT [--train-steps N] [--tokenizer-only]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="build only the tokenizer (no torch needed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.tokenizer_only:
        build_tokenizer(args.out, seed=args.seed)
    else:
        build_model(args.out, train_steps=args.train_steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
