"""The chat template's sandbox: jinja2's `ImmutableSandboxedEnvironment` (no attribute escapes, no
mutation of lists and dicts) plus limits inside it, so no template can spin or fill memory.

A chat template is code from the checkpoint. jinja's sandbox stops it reaching Python's internals
but not from working forever or building a 3 GB string in one call, so each render carries a
budget, checked *before* anything is built:
- steps: every block the template enters (a loop iteration, a branch, a macro body) costs one;
  at most `MAX_STEPS`, and the wall clock is read at each step (`MAX_SECONDS`): a plain counter and
  a clock, no signal, so the limit holds in any thread (the server renders in a worker thread).
- sizes: strings up to `MAX_CHARS` characters, lists up to `MAX_ITEMS` items and integers up to
  `MAX_INT_BITS` bits, judged from the operands of `*`, `**`, `+`, `~`, `%` and from the arguments of
  the filters and string methods that can grow text (center, indent, format, replace, join,
  ljust, zfill, '{:>N}'.format, '%0Nd' % x, lipsum, batch, ...);
- time in one call: filters that loop in Python over their input (wordwrap, urlize, title) take
  at most `MAX_SLOW_TEXT` characters;
- recursion: macro calls nest at most `MAX_DEPTH` deep.
A refusal is `TemplateLimit`, which `text.Tokenizer.render_chat` turns into one line.
"""

from __future__ import annotations

import json
import re
import string
import time
from datetime import datetime

MAX_CHARS = 32 * 2**20      # a string built or rendered (a 32 MiB chat prompt is a runaway template)
MAX_ITEMS = 2**20           # a list built
MAX_INT_BITS = 2**15        # an integer computed (about 9,900 digits)
MAX_STEPS = 1_000_000       # blocks entered in one render (real templates: tens per message)
MAX_SECONDS = 2.0           # wall clock of one render (real templates: milliseconds)
MAX_DEPTH = 100             # nested calls (macro recursion)
MAX_SLOW_TEXT = 2**20       # input of filters that loop in Python over their text
MAX_LIPSUM_WORDS = 100_000
MAX_JSON_INDENT = 1024


class TemplateLimit(Exception):
    """A template went past one of the sandbox's limits; the message says which."""


class TemplateRaised(Exception):
    """The template called raise_exception(message)."""


def _too_long(what: str, n: int, limit: int, unit: str = "characters") -> TemplateLimit:
    return TemplateLimit(f"{what} would be {n:,} {unit} (limit {limit:,})")


def _number(v) -> float:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def _size(v) -> int:
    return len(v) if isinstance(v, (str, list, tuple)) else 0


def _check_built(what: str, v, n: int) -> None:
    """`n` elements of the kind of `v` (a string's characters or a list's items) against the limit."""
    if isinstance(v, str) and n > MAX_CHARS:
        raise _too_long(what, n, MAX_CHARS)
    if isinstance(v, (list, tuple)) and n > MAX_ITEMS:
        raise _too_long(what, n, MAX_ITEMS, "items")


# ---- formats: '%0Nd' % x, '{:>N}'.format(x)

_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_widths(numbers, what: str, unit: str = "characters") -> None:
    for n in numbers:
        if abs(_number(n)) > MAX_CHARS:
            raise _too_long(what, int(abs(n)), MAX_CHARS, unit)


def check_printf(fmt: str, args) -> None:
    """Widths and precisions of a %-format, before it is applied (`'%03000000000d' % 1`)."""
    star = False
    for m in _PRINTF.finditer(fmt):
        for g in m.groups():
            if g == "*":
                star = True
            elif g:
                _check_widths([int(g)], f"a '%' format width of {g}")
    if star:
        values = args.values() if isinstance(args, dict) else args if isinstance(args, (tuple, list)) else [args]
        _check_widths(values, "a '%*' format width")


def check_brace_format(fmt: str, args) -> None:
    """Widths and precisions of a str.format spec (`'{:>3000000000}'.format(1)`)."""
    nested = False
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec:
            nested = nested or "{" in spec
            _check_widths([int(d) for d in re.findall(r"\d+", spec)], f"a format width in {spec!r}")
    if nested:
        _check_widths(args, "a nested format width")


# ---- the environment

class Budget:
    """One render's steps, call depth and deadline."""

    def __init__(self):
        self.steps, self.depth = 0, 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateLimit(f"ran more than {MAX_STEPS:,} steps (loop iterations, branches, macro calls)")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"ran longer than {MAX_SECONDS:g} s")


def _bounded_binop(env, context, operator, left, right):
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if _size(seq) and isinstance(n, int):
                _check_built("a repeated string or list", seq, _size(seq) * n)
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _too_long("an integer product", left.bit_length() + right.bit_length(), MAX_INT_BITS, "bits")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 \
                and left.bit_length() * right > MAX_INT_BITS:
            raise _too_long("an integer power", left.bit_length() * right, MAX_INT_BITS, "bits")
    elif operator == "+":
        if type(left) is type(right):
            _check_built("a concatenation", left, _size(left) + _size(right))
    elif operator == "%" and isinstance(left, str):
        check_printf(left, right)
    return super(type(env), env).call_binop(context, operator, left, right)


_PADDING_METHODS = ("ljust", "rjust", "center", "zfill")
_REFUSED_METHODS = ("translate", "maketrans")


def _estimate_call(obj, args, kwargs) -> None:
    """A string method's result size, from its arguments, before it runs."""
    name, owner = getattr(obj, "__name__", ""), getattr(obj, "__self__", None)
    if not isinstance(owner, str):
        return
    if name in _REFUSED_METHODS:
        raise TemplateLimit(f"str.{name} is not available in chat templates")
    if name in _PADDING_METHODS:
        _check_widths([*args[:1], *kwargs.values()], f"str.{name} to a width")
    elif name == "expandtabs":
        size = _number(args[0]) if args else _number(kwargs.get("tabsize", 8))
        _check_built("str.expandtabs", owner, len(owner) + owner.count("\t") * int(abs(size)))
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = owner.count(args[0]) if args[0] else len(owner) + 1
        _check_built("str.replace", owner, len(owner) + hits * max(0, len(args[1]) - len(args[0])))
    elif name in ("split", "rsplit"):
        sep = args[0] if args else kwargs.get("sep")
        if isinstance(sep, str) and sep:
            _check_built(f"str.{name}", [], owner.count(sep) + 1)
        elif len(owner) // 2 + 1 > MAX_ITEMS:  # words: count them, stopping past the limit
            for i, _ in enumerate(re.finditer(r"\S+", owner)):
                if i >= MAX_ITEMS:
                    raise _too_long(f"str.{name}", i + 1, MAX_ITEMS, "items")


def _bounded_call(env, context, obj, *args, **kwargs):
    budget = env.budget
    _estimate_call(obj, args, kwargs)
    budget.depth += 1
    try:
        if budget.depth > MAX_DEPTH:
            raise TemplateLimit(f"nested calls deeper than {MAX_DEPTH} (runaway recursion)")
        budget.step()
        result = super(type(env), env).call(context, obj, *args, **kwargs)
    finally:
        budget.depth -= 1
    _check_built("a call's result", result, _size(result))
    return result


def _bounded_join(pieces):
    """`~` in a template (jinja's str_join), refusing results beyond MAX_CHARS."""
    pieces = [str(p) for p in pieces]
    _check_built("a '~' concatenation", "", sum(map(len, pieces)))
    return "".join(pieces)


def _wrap_str_format(env, value):
    """str.format / format_map as the sandbox wraps them, with their widths checked first."""
    fmt = super(type(env), env).wrap_str_format(value)
    if fmt is None:
        return None
    text = value.__self__

    def checked(*args, **kwargs):
        check_brace_format(text, [*args, *kwargs.values()])
        return fmt(*args, **kwargs)
    return checked


def _raise(message: str):
    raise TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if isinstance(indent, (int, str)) and (_size(indent) or _number(indent)) > MAX_JSON_INDENT:
        raise TemplateLimit(f"tojson indent {indent if isinstance(indent, int) else len(indent)} "
                            f"(limit {MAX_JSON_INDENT})")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _bounded_filters(filters: dict) -> dict:
    """jinja's filters that can build big results or loop long in Python, with their inputs checked."""
    from jinja2 import pass_environment, pass_eval_context

    f = dict(filters)
    center, indent, fmt, wordwrap, urlize, title, replace, join, to_list, batch, slice_ = (
        filters[k] for k in ("center", "indent", "format", "wordwrap", "urlize", "title", "replace", "join",
                             "list", "batch", "slice"))

    def slow_text(name, s):
        if isinstance(s, str) and len(s) > MAX_SLOW_TEXT:
            raise _too_long(f"the input of |{name}", len(s), MAX_SLOW_TEXT)

    def f_center(value, width=80):
        _check_widths([width], "|center to a width")
        return center(value, width)

    def f_indent(s, width=4, first=False, blank=False):
        each = len(width) if isinstance(width, str) else int(abs(_number(width)))
        _check_built("|indent", "", len(str(s)) + (str(s).count("\n") + 2) * each)
        return indent(s, width, first, blank)

    def f_format(value, *args, **kwargs):
        check_printf(str(value), kwargs or args)
        return fmt(value, *args, **kwargs)

    @pass_environment
    def f_wordwrap(environment, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
        slow_text("wordwrap", s)
        if isinstance(wrapstring, str):
            _check_built("|wordwrap", "", len(s) * (1 + len(wrapstring)))
        return wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)

    @pass_eval_context
    def f_urlize(eval_ctx, value, *args, **kwargs):
        slow_text("urlize", value)
        return urlize(eval_ctx, value, *args, **kwargs)

    def f_title(s):
        slow_text("title", s)
        return title(s)

    @pass_eval_context
    def f_replace(eval_ctx, s, old, new, count=None):
        s, old, new = str(s), str(old), str(new)
        hits = s.count(old) if old else len(s) + 1
        _check_built("|replace", s, len(s) + hits * max(0, len(new) - len(old)))
        return replace(eval_ctx, s, old, new, count)

    @pass_eval_context
    def f_join(eval_ctx, value, d="", attribute=None):
        items = list(value)
        _check_built("|join", "", len(str(d)) * len(items) + (
            sum(len(str(x)) for x in items) if attribute is None else 0))
        return join(eval_ctx, items, d, attribute)

    @pass_eval_context  # list and slice are jinja's async variants: they take the eval context first
    def f_list(eval_ctx, value):
        if isinstance(value, str):
            _check_built("|list", [], len(value))
        return to_list(eval_ctx, value)

    def f_batch(value, linecount, fill_with=None):
        _check_widths([linecount], "|batch", "items per batch")
        return batch(value, linecount, fill_with)

    @pass_eval_context
    def f_slice(eval_ctx, value, slices, fill_with=None):
        _check_widths([slices], "|slice", "slices")
        return slice_(eval_ctx, value, slices, fill_with)

    f.update(center=f_center, indent=f_indent, format=f_format, wordwrap=f_wordwrap, urlize=f_urlize,
             title=f_title, replace=f_replace, join=f_join, list=f_list, batch=f_batch, slice=f_slice,
             tojson=_tojson)
    return f


def _lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 - jinja's parameter names
    from jinja2.utils import generate_lorem_ipsum

    words = int(abs(_number(n))) * int(abs(_number(max)))
    if words > MAX_LIPSUM_WORDS:
        raise _too_long("lipsum", words, MAX_LIPSUM_WORDS, "words")
    return generate_lorem_ipsum(n, html, min, max)


def environment():
    """A fresh environment with its own budget (one per render: renders in threads share nothing)."""
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCode(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b` -> environment.bounded_join((a, b))
            self.write("environment.bounded_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        def blockvisit(self, nodes, frame):  # every block entered costs a step
            self.writeline("environment.budget.step()")
            super().blockvisit(nodes, frame)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])
        call_binop = _bounded_binop
        call = _bounded_call
        wrap_str_format = _wrap_str_format
        code_generator_class = BoundedCode
        bounded_join = staticmethod(_bounded_join)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=["jinja2.ext.loopcontrols"])  # as transformers
    env.budget = Budget()
    env.filters = _bounded_filters(env.filters)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["lipsum"] = _lipsum
    return env


def render(text: str, **context) -> str:
    """Render template `text`; `TemplateLimit`, `TemplateRaised`, jinja's `TemplateError` or the
    template's own failure (any exception) escape for the caller to name in one line."""
    env = environment()
    template = env.from_string(text)
    env.budget = Budget()  # the clock starts after compiling
    pieces, size = [], 0
    for piece in template.generate(**context):
        size += len(piece)
        if size > MAX_CHARS:
            raise TemplateLimit(f"output exceeds {MAX_CHARS:,} characters")
        pieces.append(piece)
    return "".join(pieces)
