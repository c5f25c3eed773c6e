"""Arguments shared by the commands that load a model, and the loading itself (with progress)."""

from __future__ import annotations

from pathlib import Path
import sys

from .. import Placement, load
from ..base.errors import OffloadMoeError
from ..checkpoints.hub import parse_reference, resolve
from ..generation.generate import DEFAULT_SAMPLING, RANDOM_SEED, draw_seed
from ..base.validate import check_sampling
from .console import human_bytes, progress_bar, stderr


MODEL_HELP = ("checkpoint directory or .gguf file, or a Hugging Face repo id (org/name or org/name@revision; "
              "from the Hugging Face cache, else downloaded) (default: the bundled demo model)")


def add_model_arguments(p):
    p.add_argument("--model", metavar="PATH_OR_ID", help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--profile", default="auto", metavar="NAME",
                   help="VRAM profile: a name (cpu, 6gb ... 24gb), a .toml path, or auto (default)")
    p.add_argument("--dtype", default=None, help="compute dtype for dense weights (default: the checkpoint's)")
    p.add_argument("--context-length", type=int, default=None, metavar="N",
                   help="tokens the KV cache holds (default: min(model limit, 4096))")
    p.add_argument("--cache-slots", default=None, metavar="K",
                   help="device slots per layer for experts ('all' or a number; default: all resident)")
    p.add_argument("--prefetch", type=int, default=None, metavar="D",
                   help="MoE layers whose experts are fetched ahead of use (default: the profile's)")
    p.add_argument("--offload", choices=["ram", "disk"], default=None,
                   help="host tier for cold experts (default: RAM, or the profile's)")
    p.add_argument("--ram-budget", default=None, metavar="SIZE",
                   help="RAM for experts, e.g. 20GB, the rest on disk (default: the profile's, "
                        "or 90%% of available RAM)")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="directory for the disk tier (default: a private temporary directory, removed at exit)")
    p.add_argument("--force-context", action="store_true",
                   help="allow --context-length beyond the model's max_position_embeddings (with a warning; default: off)")
    p.add_argument("--nf4-experts", action="store_true",
                   help="quantize float experts to NF4 at load (bitsandbytes on CUDA when installed)")
    p.add_argument("--requantize", choices=["int2", "int3", "int4", "int8"], default=None,
                   help="GGUF: requantize tensor types with no exact packed form (IQ*, TQ*, ...) to this width (default: none, refuse them)")
    add_threads_argument(p)


def add_threads_argument(p):
    p.add_argument("--threads", default="auto", metavar="N",
                   help="CPU threads for torch (default: auto, the cores other work leaves free)")


def add_sampling_arguments(p, max_new_tokens_help: str = "tokens to generate at most (default 256)",
                           max_new_tokens_default: int | None = 256):
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens_default, metavar="N", help=max_new_tokens_help)
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"0 is greedy (default: the model's generation_config.json, else {DEFAULT_SAMPLING.temperature})")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: keep the most likely tokens up to this mass "
                        f"(default: the model's generation_config.json, else {DEFAULT_SAMPLING.top_p})")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="keep only the K most likely tokens "
                        f"(default: the model's generation_config.json, else {DEFAULT_SAMPLING.top_k}: no cut)")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than P x the most likely one (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide the logits of tokens already seen by R, as transformers does (default 1.0: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="A",
                   help="subtract A from the logits of tokens generated so far, as OpenAI (default 0: off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="A",
                   help="subtract A x count from the logits of tokens generated so far, as OpenAI (default 0: off)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed, for replies that repeat on a rerun; -1 draws one and prints it on stderr, "
                        "as llama.cpp does (default: a fresh one each run)")


def sampling_kwargs(args) -> dict:
    """The sampling options, checked (so a bad --temperature fails before the model loads)."""
    seed = draw_seed(args.seed)
    if args.seed == RANDOM_SEED:   # reported, so the run can be repeated
        print(f"offload-moe: seed {seed} (--seed {seed} repeats this run)", file=sys.stderr)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=seed)
    # None: the model's default sampling, checked at load; chat's None max_new_tokens is "a budget from
    # the context", settled later; check the rest now
    defaults = {"temperature": 0, "top_p": 1, "top_k": 0}
    checked = {k: defaults[k] if v is None and k in defaults else v for k, v in kwargs.items()}
    check_sampling(**dict(checked, max_new_tokens=kwargs["max_new_tokens"] or 1), stop=None)
    return dict(kwargs, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)


def load_kwargs(args) -> dict:
    slots = args.cache_slots
    if slots is not None and slots != "all":
        slots = int(slots) if slots.isdigit() else slots
    placement = Placement(context_length=args.context_length, cache_slots=slots, prefetch=args.prefetch,
                          offload=args.offload, ram_budget=args.ram_budget, offload_dir=args.offload_dir,
                          nf4_experts=args.nf4_experts, force_context=getattr(args, "force_context", False))
    return dict(placement=placement, device=args.device, dtype=args.dtype, profile=args.profile,
                requantize=args.requantize,
                threads=getattr(args, "threads", None))  # main() set them (None: leave torch's setting)


def fetch(reference, want: str = "model", refresh: bool = False):
    """A local directory for a --model/PATH argument: a Hugging Face repo id is found in the cache or
    downloaded (with a progress bar); a path is returned as it is. refresh: ask the Hub even when cached."""
    if reference is None or parse_reference(reference) is None:
        return reference
    if stderr.is_terminal:
        with progress_bar() as report:
            return resolve(reference, want=want, progress=report, refresh=refresh)
    return resolve(reference, want=want, progress=_log_download(reference), refresh=refresh)


def _log_download(reference):
    """Progress for a log file or pipe: one line when a download starts, then at each tenth."""
    shown = [-1]

    def report(what: str, done: int, total: int):
        tenth = 10 * done // total if total else 10
        if tenth > shown[0]:
            shown[0] = tenth
            stderr.print(f"offload-moe: downloading {reference}: {human_bytes(done)} of {human_bytes(total)}",
                         markup=False, highlight=False)
    return report


def check_model_argument(args) -> None:
    """`--model README.md`: say that the file given as --model is a file, before anything loads."""
    model = getattr(args, "model", None)
    if model is not None and Path(model).is_file() and Path(model).suffix.lower() != ".gguf":
        raise OffloadMoeError(f"--model {model}: a file, not a checkpoint directory (expected a directory "
                              "holding config.json and *.safetensors, or a .gguf file)")


def load_model(args):
    check_model_argument(args)
    path = fetch(args.model)
    with progress_bar() as report:
        model = load(path, progress=report, **load_kwargs(args))
    warn_about(model)
    return model


def warn_about(model) -> None:
    """What the loader accepted only because it was told to (e.g. --force-context), on stderr."""
    warning = model.settings.warning if model.settings is not None else None
    if warning:
        print(f"offload-moe: warning: {warning}", file=sys.stderr)
