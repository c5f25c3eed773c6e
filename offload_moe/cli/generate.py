"""`offload-moe generate`: complete one prompt, streaming only the generated text to stdout.

`--chat` (or `--system`) renders PROMPT as a user message through the checkpoint's chat template;
`--stop` (repeatable) ends the text at the first stop string; `--ignore-eos` generates all
`--max-new-tokens`; `--json-schema`, `--regex` or `--grammar` constrain the output (llguidance).
When the context length ends the text, a notice says so on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.text import Text

from ..generation.constrain import grammar_from
from ..base.errors import read_user_file
from ..base.user_files import read_stdin
from .common import add_model_arguments, add_sampling_arguments, load_model, sampling_kwargs
from .console import stderr
from .stats import stats_table


def add_parser(sub):
    p = sub.add_parser("generate", help="complete a prompt and print the generated text",
                       description="Complete PROMPT and print only the generated text on stdout.")
    p.add_argument("prompt", metavar="PROMPT", help="text to complete ('-' reads stdin)")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the text before this string; repeat for several (default: none)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token, up to --max-new-tokens")
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user message through the model's chat template (default: raw text)")
    p.add_argument("--system", metavar="TEXT", default=None,
                   help="system prompt for --chat (implies --chat; default: none)")
    p.add_argument("--json-schema", metavar="SCHEMA", default=None,
                   help="constrain the output to JSON matching this JSON Schema: a file, or the schema itself "
                        "('{}' for any JSON object); through llguidance (default: free text)")
    p.add_argument("--regex", metavar="RE", default=None, help="constrain the output to match this regex (default: free text)")
    p.add_argument("--grammar", metavar="FILE", default=None,
                   help="constrain the output to this Lark grammar file, llguidance's dialect (default: free text)")
    p.add_argument("--stats", action="store_true",
                   help="print generation statistics to stderr, and the expert cache's (hits, misses, bytes "
                        "moved) when experts are offloaded")
    p.set_defaults(func=run)


def constraint_kwargs(args) -> dict:
    """--json-schema / --regex / --grammar as generate()'s keywords, checked before the model loads."""
    schema = args.json_schema
    if schema is not None and not schema.lstrip().startswith("{"):
        schema = read_user_file(Path(schema), "JSON schema file")
    if schema is not None and schema.strip() == "{}":
        schema = True   # any JSON object
    grammar = read_user_file(Path(args.grammar), "grammar file") if args.grammar is not None else None
    kwargs = {k: v for k, v in (("json_schema", schema), ("regex", args.regex), ("grammar", grammar))
              if v is not None}
    if kwargs:
        grammar_from(**kwargs)
    return kwargs


def run(args) -> int:
    prompt = read_stdin(sys.stdin) if args.prompt == "-" else args.prompt
    sampling = sampling_kwargs(args)  # checked before the model loads
    constraint = constraint_kwargs(args)
    model = load_model(args)
    if args.chat or args.system is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        prompt = model.chat_ids(messages)
    kwargs = dict(sampling, stop=args.stop, ignore_eos=args.ignore_eos, **constraint)
    for piece in model.stream(prompt, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    result = model.last_result
    if result.context_full:
        stderr.print(Text(f"note: the context of {model.context_length} tokens is full: generation stopped after "
                          f"{len(result.token_ids)} tokens ({context_hint(model)})"), highlight=False)
    if args.stats:
        stderr.print(stats_table(model.stats, model.settings))
    return 0


def context_hint(model) -> str:
    """How to get more room, as it works: --context-length up to the model's limit, past it only with
    --force-context too."""
    limit = model.config.max_position_embeddings
    if model.context_length < limit:
        return f"--context-length up to {limit}, the model's limit, makes room for more"
    return (f"{limit} is the model's limit: --context-length N --force-context goes past it, "
            "with text that may degrade")
