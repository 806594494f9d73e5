"""``vllmclient run`` (a job file through a vLLM server) and ``vllmclient serve`` (a local vLLM server).

Also ``python -m vllmclient ...``; ``vllmclient-server`` stays ``vllmclient serve``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigurationError, LocalServerError
from .local_server import KEY_ON_COMMAND_LINE, LocalServer, has_api_key_option

__all__ = ["main", "serve"]

# (option, type, GenerationParams name): sampling for plain lines, in vLLM's / OpenAI's names.
_SAMPLING: list[tuple[str, type, str]] = [
    ("--max-tokens", int, "max_new_tokens"),
    ("--temperature", float, "temperature"),
    ("--top-p", float, "top_p"),
    ("--top-k", int, "top_k"),
    ("--min-p", float, "min_p"),
    ("--seed", int, "seed"),
    ("--frequency-penalty", float, "frequency_penalty"),
    ("--presence-penalty", float, "presence_penalty"),
    ("--repetition-penalty", float, "repetition_penalty"),
    ("--min-tokens", int, "min_tokens"),
    ("--logprobs", int, "logprobs"),
    ("--stop", str, "stop"),
]
_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        return serve(args[1:])
    parser = _parser()
    options = parser.parse_args(args)
    if options.command is None:
        parser.print_help(sys.stderr)
        return 2
    return _run(parser, options)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllmclient", allow_abbrev=False,
                                     description="A fast, hard-to-break client for vLLM's OpenAI-compatible server.")
    commands = parser.add_subparsers(dest="command", metavar="{run,serve}")
    commands.add_parser("serve", help="start a local vLLM server (vllmclient serve --help)", add_help=False)
    run = commands.add_parser(
        "run", allow_abbrev=False, help="run a JSON-lines job file; run the same command again to resume",
        description="Run every line of INPUT (vLLM/OpenAI batch lines for /v1/chat/completions or /v1/completions, "
        "or plain {\"custom_id\", \"messages\"} lines) and append one run_batch record per line to OUTPUT. Run the "
        "same command again to resume: lines with a record are skipped, transient failures retried.",
    )
    run.add_argument("input", type=Path, metavar="INPUT.jsonl")
    run.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT.jsonl")
    run.add_argument("--base-url", action="append", metavar="URL",
                     help="the vLLM server (default http://localhost:8000); repeat for replicas of one model")
    run.add_argument("--model", help="the served model (default: the one the server serves)")
    run.add_argument("--tokenizer", help="render conversations with this tokenizer's chat template and pack them "
                     "(default: the server renders them, one request each)")
    run.add_argument("--tokenizer-revision")
    run.add_argument("--api-key-file", metavar="PATH", help="file holding the server's API key (default: $VLLM_API_KEY)")
    run.add_argument("--api-key", action=_RefuseKeyOnCommandLine, help=argparse.SUPPRESS)  # others see it with ps
    run.add_argument("--max-concurrency", type=_number(int, 1), default=256,
                     help="most sequences on the server at once (256)")
    run.add_argument("--timeout", type=_number(float, 0, above=True), default=120.0,
                     help="seconds a request may take (120)")
    run.add_argument("--max-retries", type=_number(int, 0), default=6, help="retries of a failed request by the SDK (6)")
    run.add_argument("--summary-json", type=Path, metavar="PATH", help="also write the summary here, as JSON")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    sampling = run.add_argument_group("sampling for plain lines (batch lines carry their own in body)")
    sampling.add_argument("--n", type=_number(int, 1), default=1, help="generations per line (1)")
    for option, kind, _ in _SAMPLING:
        sampling.add_argument(option, type=kind, action="append" if option == "--stop" else "store")
    sampling.add_argument("--ignore-eos", action="store_true", default=None, help="generate max-tokens every time")
    sampling.add_argument("--chat-template-kwargs", type=_json_object, metavar="JSON")
    return parser


def _number(kind: type, least: float, *, above: bool = False) -> Any:
    """An argparse type: a number >= (or >) ``least``, refused as the option typed rather than later by its field."""
    rule = f"{'a number >' if above else 'an integer >='} {least}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < least or (above and value == least):
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}")
        return value

    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"enable_thinking\": false}}', got {text!r}")
    return value


def _run(parser: argparse.ArgumentParser, options: argparse.Namespace) -> int:
    from .client import ClientvLLM
    from .errors import ConfigurationError, InvalidInputError, VLLMClientError
    from .jobs import run_batch_file
    from .params import parse_params

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")  # ours begin "vllmclient: "
    given = [(option, name, getattr(options, option[2:].replace("-", "_"))) for option, _, name in _SAMPLING]
    given += [("--chat-template-kwargs", "chat_template_kwargs", options.chat_template_kwargs),
              ("--ignore-eos", "ignore_eos", options.ignore_eos)]
    params: dict[str, Any] = {}
    for option, name, value in given:
        if value is None:
            continue
        try:  # each alone, so that the error names the option as typed
            parse_params({name: value})
        except VLLMClientError as exc:
            parser.error(f"argument {option}: {_as_options(str(exc))}")
        params[name] = value
    if options.summary_json is not None and options.summary_json.is_dir():
        parser.error(f"argument --summary-json: {options.summary_json} is a directory; pass a file path, such as "
                     f"{options.summary_json / 'summary.json'}")
    if options.summary_json is not None:
        _not_a_job_file(parser, options.summary_json, options.input, options.output, options.api_key_file)
    urls = options.base_url or ["http://localhost:8000"]
    settings: dict[str, Any] = {
        "base_url": urls[0] if len(urls) == 1 else urls, "model": options.model, "tokenizer": options.tokenizer,
        "tokenizer_revision": options.tokenizer_revision, "max_concurrency": options.max_concurrency,
        "timeout": options.timeout, "max_retries": options.max_retries,
    }
    key = _read_api_key(parser, options.api_key_file)
    if key is not None:
        settings["api_key"] = key
    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: what is finished is kept
    resume = f"Run the same command again to resume: {options.output} keeps every finished line."
    client = None
    try:
        client = ClientvLLM(**settings)
        summary = run_batch_file(client, options.input, options.output, progress=not options.no_progress,
                                 num_generations=options.n, **params)
    except KeyboardInterrupt:
        print(f"\nStopped. {resume}", file=sys.stderr, flush=True)
        return _INTERRUPTED
    except InvalidInputError as exc:  # options that fail together (checked before the job begins)
        parser.error(_as_options(str(exc)))
    except ConfigurationError as exc:  # the output's or input's file, or options differing from the output's job
        print(f"error: {_as_options(str(exc))}", file=sys.stderr, flush=True)
        return 1
    except VLLMClientError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if client is not None:
            client.close()
    print(summary, file=sys.stderr, flush=True)
    if options.summary_json is not None:
        try:
            options.summary_json.parent.mkdir(parents=True, exist_ok=True)
            options.summary_json.write_text(json.dumps(summary.as_dict(), indent=1) + "\n")
        except OSError as exc:
            print(f"error: could not write the summary to {options.summary_json} ({exc.strerror or exc}); it is "
                  f"printed above, and {options.output} holds every record.", file=sys.stderr, flush=True)
            return 1
    return 0


def _not_a_job_file(parser: argparse.ArgumentParser, summary: Path, source: Path, output: Path,
                    api_key_file: str | None) -> None:
    """The summary is written over its path after the job: never over the input, the output, its job file or the
    API key file."""
    from ._job_output import sidecar_path

    files = [("the input", source), ("the output", output), ("the output's job file", sidecar_path(output))]
    if api_key_file is not None:
        files.append(("the --api-key-file", Path(api_key_file)))
    for what, path in files:
        same = summary.resolve() == path.resolve()
        if not same and summary.exists() and path.exists():
            same = summary.samefile(path)
        if same:
            parser.error(f"argument --summary-json: {summary} is {what} ({path}); the summary would be written over "
                         "it. Pass another path, such as summary.json")


def _as_options(message: str) -> str:
    """A message about generate's parameters, with the command line's options instead (``--n 2``)."""
    for option, name in [*((option, name) for option, _, name in _SAMPLING), ("--n", "num_generations")]:
        message = re.sub(rf"\b{name}=", f"{option} ", message)
        message = re.sub(rf"(?<![-\w]){name}\b", option, message)
    return message


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops a command as cleanly as Ctrl-C."""
    raise KeyboardInterrupt


_KEY_ALTERNATIVES = (
    "Set VLLM_API_KEY in the environment (e.g. `VLLM_API_KEY=$(cat key.txt) vllmclient serve ...`) "
    "or pass --api-key-file PATH"
)


class _RefuseKeyOnCommandLine(argparse.Action):
    """``--api-key KEY`` is refused, and the key is not repeated in the message."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: object, values: object, option_string: object = None
    ) -> None:
        parser.error(f"--api-key is not accepted on the command line: {KEY_ON_COMMAND_LINE}. {_KEY_ALTERNATIVES}.")


def _read_api_key(parser: argparse.ArgumentParser, path: str | None) -> str | None:
    """The key from ``--api-key-file`` (surrounding whitespace removed), else ``$VLLM_API_KEY``, else None."""
    if path is None:
        return os.environ.get("VLLM_API_KEY") or None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"cannot read --api-key-file {path} ({exc.__class__.__name__}: {exc})")
    if not key:
        parser.error(f"--api-key-file {path} is empty: write the key in it")
    if any(char in key for char in "\r\n"):
        parser.error(f"--api-key-file {path} holds several lines: write one key, on one line")
    return key


def serve(argv: Sequence[str] | None = None) -> int:
    """``vllmclient serve`` (also ``vllmclient-server``, ``python -m vllmclient.local_server``): serve until
    Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(
        prog="vllmclient serve",
        description="Start a local vLLM OpenAI-compatible server (default: embedded tiny model).",
        epilog="Arguments after '--' are passed to vLLM unchanged (except --api-key: "
        "use $VLLM_API_KEY or --api-key-file).",
        allow_abbrev=False,  # "--api-key" must never be taken for "--api-key-file"
    )
    parser.add_argument("--model", help="model folder (default: the embedded tiny model)")
    parser.add_argument("--port", type=int, help="port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--python",
        help="interpreter with vLLM (default: $VLLMCLIENT_SERVER_PYTHON, else .venv-vllm)",
    )
    parser.add_argument("--served-model-name")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument(
        "--api-key-file", metavar="PATH",
        help="file holding the API key clients must send (default: $VLLM_API_KEY; none: no key needed)",
    )
    parser.add_argument("--api-key", action=_RefuseKeyOnCommandLine, help=argparse.SUPPRESS)
    parser.add_argument("--kv-cache-gib", type=float, default=1)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--compile", action="store_true", help="drop --enforce-eager (slower start)"
    )
    parser.add_argument("--log", help="server log file (default: a temp file)")
    parser.add_argument("-v", "--verbose", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    if has_api_key_option(extra):
        parser.error(f"--api-key after '--' is not passed to vLLM: {KEY_ON_COMMAND_LINE}. {_KEY_ALTERNATIVES}.")
    args = parser.parse_args(argv)
    api_key = _read_api_key(parser, args.api_key_file)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server = LocalServer(
            args.model, python=args.python, port=args.port, host=args.host,
            served_model_name=args.served_model_name, max_model_len=args.max_model_len,
            api_key=api_key, extra_args=extra, startup_timeout=args.startup_timeout,
            enforce_eager=not args.compile, kv_cache_gib=args.kv_cache_gib, log_path=args.log,
        )
    except ConfigurationError as exc:
        parser.error(str(exc))
    try:
        server.start()
        key = f"API key from {'--api-key-file' if args.api_key_file else '$VLLM_API_KEY'}" if api_key else "no API key"
        # Said before the URL: whoever waits for the URL line (a script, a test) may stop us right after it.
        print(f"model {server.served_model_name!r} from {server.model_dir}; {key}; log {server.log_path}; "
              "Ctrl-C to stop", file=sys.stderr, flush=True)
        print(server.base_url, flush=True)
        while server.poll() is None:
            time.sleep(0.5)
        print(
            f"vLLM server exited with code {server.poll()}:\n{server.log_tail()}",
            file=sys.stderr,
        )
        return 1
    except LocalServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
