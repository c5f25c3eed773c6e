"""Entry point: parse the command line, run one command, map user errors to one line and exit 1
(usage errors exit 2, Ctrl-C 130: see parser.py)."""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from .. import __version__
from ..base.errors import OffloadMoeError
from .parser import EXIT_CODES, EXIT_ERROR, EXIT_INTERRUPTED, Parser
from ..base.threads import set_threads

COMMANDS = ["generate", "chat", "info", "plan", "quantize", "tune", "bench", "serve", "pull", "list"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="offload-moe",
        description="Run Mixture-of-Experts language models on one consumer GPU or on the CPU.",
        epilog=EXIT_CODES[0].upper() + EXIT_CODES[1:] + ". NO_COLOR (or output that is not a terminal) turns "
               "styling off.")
    parser.add_argument("--version", action="version", version=f"offload-moe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if hasattr(args, "threads"):  # generate, chat, serve, tune, bench
            args.threads = set_threads(args.threads)  # the number, passed on to load()
        return args.func(args) or 0
    except OffloadMoeError as e:
        print(f"offload-moe: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("offload-moe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `offload-moe generate ... | head` closed the pipe: not an error
        sys.stderr.close()
        return 0
    finally:
        torch.set_num_threads(threads)  # main() called in-process (tests) leaves the pool as it was


if __name__ == "__main__":
    sys.exit(main())
