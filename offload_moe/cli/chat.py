"""`offload-moe chat`: a multi-turn conversation in the terminal, replies streamed token by token.

In a terminal: a `>>> ` prompt with line editing and history (readline), slash commands, a dim status
line on stderr after each reply. With stdin not a terminal (`echo hi | offload-moe chat`): the whole
input is one user message and stdout receives only the reply and a newline.

Multi-line input: end a line with a backslash to continue it on the next (as llama.cpp), or wrap
the message in three double quotes (as ollama). Keys typed while a reply streams are neither echoed into it nor
kept as the next input. Ctrl-C during a reply stops it and keeps the partial reply in the
conversation (a reply with no text yet is dropped with its question), and the session goes on. At the
prompt, Ctrl-D (or /exit) ends the session with exit status 0; Ctrl-C ends it with 130, as it ends
every command.
Only the reply text goes to stdout; everything else (summary, notices, /help, /stats) goes to stderr.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import sys
import traceback

from rich.text import Text

from .. import load
from ..api.chat_session import ChatSession
from ..base.errors import OffloadMoeError
from ..base.runtime import DEMO_DIR
from ..base.user_files import read_stdin
from .common import (add_model_arguments, add_sampling_arguments, check_model_argument, fetch, load_kwargs,
                     sampling_kwargs, warn_about)
from .console import human_bytes, progress_bar, stderr
from .parser import EXIT_INTERRUPTED
from .stats import stats_table

PROMPT = ">>> "
CONTINUE = "... "
HELP = """\
/help          this help
/reset         start a new conversation (the system prompt stays)
/system TEXT   set the system prompt (/system alone removes it)
/stats         expert cache and speed statistics
/save FILE     write the transcript (messages and settings) as JSON (--force: overwrite)
/exit          leave (also /quit or Ctrl-D; Ctrl-C at the prompt leaves with exit status 130)
Ctrl-C during a reply stops it; the partial reply stays in the conversation.
Keys typed while a reply streams are ignored.
Multi-line: end a line with \\ to continue it, or start and end the message with \"\"\".
Start a line with // to send a message that begins with /."""


def add_parser(sub):
    p = sub.add_parser("chat", help="chat with a model in the terminal (multi-turn, streamed)",
                       description="Chat with a model (default: the bundled demo model). In a terminal: "
                                   "multi-turn with /help for commands. With piped input: the whole input "
                                   "is one message and only the reply is printed.")
    add_model_arguments(p)
    if "--profile" not in p._option_string_actions:
        p.add_argument("--profile", metavar="NAME", default=None,
                       help="memory profile for the expert cache (default: the loader's choice)")
    add_sampling_arguments(p, "reply budget in tokens (default: a quarter of the context, 16 to 2048, "
                              "so the conversation keeps room)", None)
    p.add_argument("--system", metavar="TEXT", default=None, help="system prompt (default: none)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token (default: a reply ends there)")
    p.set_defaults(func=run)


def run(args) -> int:
    check_model_argument(args)
    interactive = sys.stdin.isatty()
    message = None
    if not interactive:  # read before loading: an empty pipe is an error worth reporting fast
        message = read_stdin(sys.stdin).strip()
        if not message:
            raise OffloadMoeError("stdin is empty: pipe a message in, or run `offload-moe chat` in a terminal")
    generation = dict(sampling_kwargs(args), ignore_eos=args.ignore_eos)  # checked before loading
    model = load_chat_model(args)
    warn_about(model)  # e.g. a context past the model's limit, allowed by --force-context
    session = ChatSession(model, system=args.system, **generation)
    note(describe_model(model, sampling=model.generation.describe(args.temperature, args.top_p, args.top_k)),
         style=None)
    chat = ChatLoop(session)
    if not interactive:
        chat.turn(message, raise_errors=True)
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    note('Type a message; /help lists commands; """ or a trailing \\ for several lines; Ctrl-D exits.')
    return chat.interactive(read_message)


def read_message(read=input) -> str:
    """One message from the terminal: a line; lines ending in `\\` continue (the backslash goes);
    a message opened with triple quotes runs to the line that closes them."""
    line = read(PROMPT)
    if line.lstrip().startswith('"""'):
        body = line.lstrip()[3:]
        lines = []
        while not body.rstrip().endswith('"""'):
            lines.append(body)
            body = read(CONTINUE)
        lines.append(body.rstrip()[:-3])
        return "\n".join(lines).strip("\n")
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read(CONTINUE)
    return "\n".join(lines + [line])


def load_chat_model(args):
    kwargs = load_kwargs(args)
    profile = getattr(args, "profile", None)
    if profile is not None and "profile" not in kwargs and _accepts(load, "profile"):
        kwargs["profile"] = profile
    path = fetch(args.model)  # a Hugging Face repo id: from the cache, else downloaded
    if not stderr.is_terminal:  # no bar (nor the blank line it leaves) when stderr goes to a file or pipe
        return load(path, **kwargs)
    with progress_bar() as report:
        return load(path, progress=report, **kwargs)


def _accepts(function, name: str) -> bool:
    params = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


class ChatLoop:
    """Reads lines, runs commands and turns, prints. `read_line` raises EOFError at the end of input."""

    def __init__(self, session: ChatSession):
        self.session = session
        self.model = session.model

    def interactive(self, read_line) -> int:
        while True:
            try:
                line = read_line()
            except (EOFError, KeyboardInterrupt) as end:  # Ctrl-D ends the session, Ctrl-C interrupts it
                sys.stdout.write("\n")
                sys.stdout.flush()
                return EXIT_INTERRUPTED if isinstance(end, KeyboardInterrupt) else 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                try:
                    if self.command(line) == "exit":
                        return 0
                except KeyboardInterrupt:  # Ctrl-C during /stats or /save: back to the prompt
                    sys.stdout.write("\n")
                continue
            self.turn(line[1:] if line.startswith("//") else line)

    # ---- commands ----
    def command(self, line: str) -> str | None:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        name = name.lower()
        s = self.session
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name in ("/help", "/?"):
            show(Text(HELP))
        elif name == "/reset":
            s.reset()
            note("conversation cleared" + (" (system prompt kept)" if s.system else ""))
        elif name == "/system":
            s.set_system(rest)
            note(f"system prompt set: {rest}" if rest else "system prompt removed")
        elif name == "/stats":
            self.print_stats()
        elif name == "/save":
            if not rest:
                error("/save needs a file name: /save FILE")
                return None
            words = rest.split()
            force = "--force" in words
            target = " ".join(w for w in words if w != "--force") if force else rest
            try:
                path = s.save(target, force=force)
            except OffloadMoeError as e:
                error(str(e))
                return None
            n = len(s.transcript()["messages"])
            note(f"saved {n} message{'s' * (n != 1)} to {path}")
        else:
            error(f"unknown command {name!r}")
            show(Text(HELP))
        return None

    def print_stats(self):
        stats = self.model.stats
        show(stats_table(stats))
        rate = hit_rate(stats)
        s = self.session
        turns = len(s.history) // 2
        extra = [f"{turns} turn{'s' * (turns != 1)} in context", f"{s.trimmed_turns} trimmed"]
        if rate is not None and "hit_rate" not in (stats.get("experts") or {}):
            extra.insert(0, f"expert cache hit rate {rate:.1%}")
        note(" · ".join(extra))

    # ---- one turn ----
    def turn(self, text: str, raise_errors: bool = False) -> None:
        before = self.model.last_timing
        counters = expert_counters(self.model.stats)
        turn, shown = None, ""
        try:
            turn = self.session.send(text)
            if turn.dropped_turns:
                n = turn.dropped_turns
                note(f"dropped {'the oldest turn' if n == 1 else f'the {n} oldest turns'} to fit the context of "
                     f"{self.model.context_length} tokens")
            with typed_keys_ignored():
                for piece in turn:
                    with interrupt_deferred():  # a Ctrl-C lands before or after a piece is out, never between
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                        shown += piece
            sys.stdout.write("\n")
            sys.stdout.flush()
            if turn.cut_by_context:
                note(f"reply cut at {turn.max_new_tokens} tokens: the context of {self.model.context_length} "
                     "tokens is full (/reset starts afresh)")
            elif turn.result is not None and turn.result.finish_reason == "length":
                note(f"reply cut at the budget of {turn.max_new_tokens} tokens (--max-new-tokens raises it)")
        except KeyboardInterrupt:
            if raise_errors:
                raise
            if turn is not None:
                turn.close(shown)                # what was kept is what was shown
            sys.stdout.write("\n")
            sys.stdout.flush()
            kept = turn is not None and turn.text
            note("reply interrupted " + ("(partial reply kept)" if kept else "(nothing kept: the message was dropped)"))
        except OffloadMoeError as e:
            if raise_errors:
                raise
            self._end_line(turn)
            error(str(e))
        except Exception as e:  # a bug, or the device failing (out of memory): keep the session alive
            if raise_errors:
                raise
            self._end_line(turn)
            error(f"{type(e).__name__}: {e}")
            if os.environ.get("OFFLOAD_MOE_DEBUG"):
                traceback.print_exc()
        finally:
            if turn is not None:
                turn.close(shown)                # what was kept is what was shown
        if self.model.last_timing is not before:
            note(self.status_line(counters))

    @staticmethod
    def _end_line(turn):
        if turn is not None and turn.text:
            sys.stdout.write("\n")
            sys.stdout.flush()

    def status_line(self, counters_before: dict) -> str:
        t = self.model.last_timing
        parts = [f"{t.new_tokens} token{'s' * (t.new_tokens != 1)}",
                 f"prefill {t.prefill_seconds:.2f} s ({t.prompt_tokens} tok)",
                 f"{t.decode_tokens_per_second:.1f} tok/s"]
        after = expert_counters(self.model.stats)
        if "hits" in after and "misses" in after:
            hits = after["hits"] - counters_before.get("hits", 0)
            misses = after["misses"] - counters_before.get("misses", 0)
            if hits + misses:
                parts.append(f"hit rate {hits / (hits + misses):.0%}")
        parts.append(memory_in_use(self.model.device))
        return " · ".join(parts)


# ---- helpers ----
@contextlib.contextmanager
def typed_keys_ignored():
    """While a reply streams: the terminal echoes no keys, and what was typed is discarded at the end
    (so it neither garbles the reply nor becomes the next message). Ctrl-C still interrupts, without
    the terminal dropping the reply text still queued for the screen."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:
        yield
        return
    import termios

    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHONL)
    quiet[3] |= termios.NOFLSH  # Ctrl-C must not discard reply text already written: what was kept is what was shown
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


@contextlib.contextmanager
def interrupt_deferred():
    """A Ctrl-C arriving inside the block is raised once the block is done."""
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    except ValueError:  # not the main thread: no signal handling to defer
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def show(renderable):
    """Print on stderr; a Ctrl-C arriving meanwhile is raised only once the line is out (rich keeps
    a half-written line in its buffer and would print it again with the next line)."""
    sys.stdout.flush()
    with interrupt_deferred():
        stderr.print(renderable, highlight=False)


def note(message: str, style: str | None = "dim"):
    show(Text(message, style=style or ""))


def error(message: str):
    show(Text(f"error: {message}", style="bold red"))


def describe_model(model, sampling: str | None = None) -> str:
    """One line: what was loaded, where, how the experts are placed (whatever `settings` says) and the
    sampling in effect (`sampling`, else the model's defaults)."""
    c = model.config
    name = "demo model" if _is_demo(model.path) else str(model.path)
    parts = [name, str(model.device), str(model.dtype).removeprefix("torch."),
             f"{c.num_layers} layers × {c.num_experts} experts, top-{c.top_k}",
             f"context {model.context_length} tokens"]
    settings = model.settings.as_dict()
    if sampling is not None:
        settings["sampling"] = sampling
    for shown in ("context_length", "device", "dtype"):
        settings.pop(shown, None)
    if settings.get("profile") is not None:
        parts.append(f"profile {settings.pop('profile')}")
    placement = settings.pop("experts", None)
    cpu_mode, cpu_layers = settings.pop("cpu_experts", None), settings.pop("cpu_layers", None)
    if placement == "resident":
        parts.append("all experts resident")
    elif placement == "cpu":  # the CPU computes every expert: the CPU tier's own fields say nothing more
        parts.append("all experts on the CPU")
    elif placement is not None:
        parts.append(f"experts {placement}")
    if placement != "cpu" and cpu_mode == "layers" and cpu_layers:
        parts.append(f"experts of {cpu_layers} MoE layer{'s' * (cpu_layers != 1)} on the CPU")
    elif placement != "cpu" and cpu_mode == "hybrid":
        parts.append("experts split between CPU and GPU")
    slots = settings.pop("cache_slots", None)
    if slots is not None:
        values = list(slots) if isinstance(slots, (list, tuple)) else [slots]
        shown = str(values[0]) if len(set(values)) == 1 else f"{min(values)}-{max(values)}"
        parts.append(f"{shown} expert slots/layer")
    if settings.get("prefetch") is not None:
        parts.append(f"prefetch {settings.pop('prefetch')}")
    ram, disk = settings.pop("ram_layers", None), settings.pop("disk_layers", None)
    offload_dir = settings.pop("offload_dir", None)
    if ram is not None or disk is not None:
        where = [f"{label} ({n} layer{'s' * (n != 1)})" for label, n in (("RAM", ram), ("disk", disk)) if n]
        parts.append("cold experts in " + (" + ".join(where) or "RAM")
                     + (f" at {offload_dir}" if disk and offload_dir else ""))
    for key, value in settings.items():  # keys this line does not know yet
        if value is not None and not isinstance(value, (dict, list, tuple)):
            parts.append(f"{key.replace('_', ' ')} {value}")
    return " · ".join(parts)


def _is_demo(path) -> bool:
    try:
        return os.path.samefile(path, DEMO_DIR)
    except OSError:
        return False


def expert_counters(stats: dict) -> dict:
    experts = stats.get("experts") or {}
    return {k: experts[k] for k in ("hits", "misses") if isinstance(experts.get(k), (int, float))}


def hit_rate(stats: dict) -> float | None:
    c = expert_counters(stats)
    if "hits" in c and "misses" in c and c["hits"] + c["misses"]:
        return c["hits"] / (c["hits"] + c["misses"])
    return None


def memory_in_use(device) -> str:
    import torch

    if getattr(device, "type", None) == "cuda":
        return f"VRAM {human_bytes(torch.cuda.memory_allocated(device))}"
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return f"RSS {human_bytes(pages * os.sysconf('SC_PAGE_SIZE'))}"
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return f"peak RSS {human_bytes(peak * (1 if sys.platform == 'darwin' else 1024))}"
