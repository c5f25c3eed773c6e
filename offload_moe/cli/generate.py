"""`offload-moe generate`: complete one prompt, streaming only the generated text to stdout."""

from __future__ import annotations

import sys

from ..user_files import read_stdin
from .common import add_model_arguments, add_sampling_arguments, load_model, sampling_kwargs
from .console import stderr
from .stats import stats_table


def add_parser(sub):
    p = sub.add_parser("generate", help="complete a prompt and print the generated text",
                       description="Complete PROMPT and print only the generated text on stdout.")
    p.add_argument("prompt", metavar="PROMPT", help="text to complete ('-' reads stdin)")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--stats", action="store_true", help="print expert cache statistics to stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    prompt = read_stdin(sys.stdin) if args.prompt == "-" else args.prompt
    sampling = sampling_kwargs(args)  # checked before the model loads
    model = load_model(args)
    for piece in model.stream(prompt, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        stderr.print(stats_table(model.stats))
    return 0
