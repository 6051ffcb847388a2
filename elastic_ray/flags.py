"""Command-line flags the entry points share: the engine and cache settings of jobs/caption.py and
jobs/serve.py, defined once. Imports nothing heavy, so `--help` stays quick."""

import argparse
import json


def parse_cache_option(text: str) -> tuple[str, object]:
    """A method option from a command line (argparse type), `KEY=VALUE`: the value read as JSON
    (16, false) or else kept as a string (original)."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"a cache option looks like KEY=VALUE (protect=16), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def parse_kv_memory(text: str) -> int | float:
    """KV memory from a command line (argparse type): bytes (an integer) or a fraction of free
    memory (0.25, 1e-3)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bytes (an integer) or a fraction (0.25), got {text!r}") from None


def add_engine_flags(parser: argparse.ArgumentParser, defaults, budget_type=float,
                     budget_help: str = "fraction of KV entries kept, in (0, 1]") -> None:
    """--method, --budget, --cache-option, --max-tokens, --max-num-seqs and --kv-cache-memory, with
    the defaults of `defaults` (an object with those settings as attributes)."""
    parser.add_argument("--method", default=defaults.method,
                        help="cache method: full, elastic (the paper's), elastic-vl, h2o or streaming")
    parser.add_argument("--budget", type=budget_type, default=defaults.budget, help=budget_help)
    parser.add_argument("--cache-option", action="append", default=[], type=parse_cache_option, metavar="KEY=VALUE",
                        help="an option of the method (repeatable), e.g. protect=16 for elastic")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                        help="the most tokens a caption or an answer may generate")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                        help="sequences an engine decodes at once")
    parser.add_argument("--kv-cache-memory", type=parse_kv_memory, default=defaults.kv_cache_memory,
                        help="each engine's KV memory: bytes (an integer) or a fraction of the device's free memory "
                             "(a number with a point); it sets the slots, at most --max-num-seqs")


def engine_settings(args: argparse.Namespace) -> dict:
    """The settings `add_engine_flags` parsed, by name; `cache_options` a dict."""
    return {"method": args.method, "budget": args.budget, "cache_options": dict(args.cache_option),
            "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs, "kv_cache_memory": args.kv_cache_memory}


def refuse(parser: argparse.ArgumentParser, message: str) -> None:
    """Exit 2 with one line: the flags parsed, a value is wrong (no usage text)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")
