"""VRAM profiles: a few TOML keys that say how much of which memory the runtime may use.

A profile is the user's side of the memory plan (`planner.plan` is the other): the GPU budget, what
to keep free for activations, the context the KV cache is sized for, the bit widths, how many
expert slots, how deep to prefetch, and where cold experts live. Bundled profiles ship in the
repo's `profiles/` directory (installed as `offload_moe.profiles_data`); users add their own in
`$XDG_CONFIG_HOME/offload-moe/profiles/` (the `tune` command writes there), which shadow bundled
ones of the same name. Every key is validated when loaded, so a typo fails on one line naming the
file and key instead of surfacing later as an out-of-memory error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..base.errors import OffloadMoeError, read_user_file
from ..base.runtime import SizeError, size_in_bytes

# Bits per weight of each width a profile may name; bf16/fp16 are stored as is, the ints groupwise.
BIT_WIDTHS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2}
MAX_BYTES = 4 * 10**12     # a budget above 4 TB is a typo (a missing unit dot, an extra zero)
MAX_CONTEXT = 1 << 24      # tokens
MAX_PREFETCH = 64
MAX_SLOTS = 1024



@dataclass(frozen=True)
class Profile:
    name: str                   # bundled or user profile name, or the file's stem
    source: str                 # the file it came from: errors and `plan` name it
    device: str                 # "cuda" or "cpu"
    vram_budget: int            # bytes the runtime may use on the GPU; 0 on the CPU
    reserve: int                # bytes kept free for activations and workspace
    context_length: int         # tokens the KV cache is sized for
    experts_bits: str           # [bits] experts: one of BIT_WIDTHS
    attention_bits: str         # [bits] attention
    embeddings_bits: str        # [bits] embeddings (input embeddings and lm_head)
    cache_slots: int | None     # expert slots per layer on the GPU; None = "auto" (as many as fit)
    prefetch: int               # layers ahead whose guessed experts are copied early (0 = on demand only)
    offload: str                # "ram": layers of experts in RAM up to ram_budget, the rest on disk;
                                # "disk": every layer in memory-mapped files
    ram_budget: int | None      # bytes of host RAM for expert copies; None = "auto" (measured)




def _budget(value: Any) -> int:
    n = size_in_bytes(value)
    if n > MAX_BYTES:
        raise SizeError(f"a size of at most {MAX_BYTES // 10**12} TB (a typo in the number or unit?)")
    return n


def _auto_or(parse):
    return lambda v: None if v == "auto" else parse(v)


def _int_in(lo: int, hi: int):
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise SizeError(f"an integer from {lo} to {hi}")
        return v
    return parse


def _one_of(*choices: str):
    def parse(v: Any) -> str:
        if v not in choices:
            raise SizeError("one of " + ", ".join(f"{c!r}" for c in choices))
        return v
    return parse


# field -> (key as written in the TOML file, parser, default; ... = required)
_KEYS: dict[str, tuple[str, Any, Any]] = {
    "device": ("device", _one_of("cuda", "cpu"), ...),
    "vram_budget": ("vram_budget", _budget, 0),
    "reserve": ("reserve", _budget, "1GB"),
    "context_length": ("context_length", _int_in(1, MAX_CONTEXT), 4096),
    "experts_bits": ("bits.experts", _one_of(*BIT_WIDTHS), "int4"),
    "attention_bits": ("bits.attention", _one_of(*BIT_WIDTHS), "int4"),
    "embeddings_bits": ("bits.embeddings", _one_of(*BIT_WIDTHS), "fp16"),
    "cache_slots": ("cache_slots", _auto_or(_int_in(1, MAX_SLOTS)), "auto"),
    "prefetch": ("prefetch", _int_in(0, MAX_PREFETCH), 1),
    "offload": ("offload", _one_of("ram", "disk"), "ram"),
    "ram_budget": ("ram_budget", _auto_or(_budget), "auto"),
}
_TOML_TO_FIELD = {key: name for name, (key, _, _) in _KEYS.items()}
_EXPECTED = {"cache_slots": "'auto' or ", "ram_budget": "'auto' or "}


def _flatten(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """TOML document -> {field name: raw value}, rejecting unknown keys and a non-table [bits]."""
    out = {}
    for key, value in raw.items():
        if key == "bits":
            if not isinstance(value, dict):
                raise OffloadMoeError(f"{source}: key 'bits' = {value!r}, expected a [bits] table "
                                      "with experts, attention, embeddings")
            for sub, v in value.items():
                if f"bits.{sub}" not in _TOML_TO_FIELD:
                    raise OffloadMoeError(f"{source}: unknown key 'bits.{sub}' "
                                          "(known: bits.experts, bits.attention, bits.embeddings)")
                out[_TOML_TO_FIELD[f"bits.{sub}"]] = v
        elif key in _TOML_TO_FIELD:
            out[_TOML_TO_FIELD[key]] = value
        else:
            known = ", ".join(k for k, _, _ in _KEYS.values())
            raise OffloadMoeError(f"{source}: unknown key {key!r} (known: {known})")
    return out


def _build(name: str, source: str, raw: dict[str, Any], overrides: dict[str, Any]) -> Profile:
    values = _flatten(raw, source)
    for field, value in overrides.items():
        if field not in _KEYS:
            raise OffloadMoeError(f"{source}: unknown override {field!r} (known: {', '.join(_KEYS)})")
        if value is not None:
            values[field] = value
    parsed = {}
    for field, (key, parse, default) in _KEYS.items():
        where = f"override {field}" if overrides.get(field) is not None else f"key {key!r}"
        if field not in values and default is ...:
            raise OffloadMoeError(f"{source}: missing key {key!r}")
        value = values.get(field, default)
        try:
            parsed[field] = parse(value)
        except SizeError as e:
            raise OffloadMoeError(f"{source}: {where} = {value!r}, expected {_EXPECTED.get(field, '')}{e}") \
                from None
    where = "override vram_budget" if overrides.get("vram_budget") is not None else "key 'vram_budget'"
    if parsed["device"] == "cuda" and parsed["vram_budget"] == 0:
        raise OffloadMoeError(f"{source}: {where} missing or 0, expected a size such as '12GB' "
                              "when device = 'cuda'")
    if parsed["device"] == "cpu" and parsed["vram_budget"] != 0:
        raise OffloadMoeError(f"{source}: {where} = {values['vram_budget']!r}, expected 0 or "
                              "absent when device = 'cpu'")
    return Profile(name=name, source=source, **parsed)


# ---- where profiles come from ----

def bundled_dir():
    """The bundled profiles: the installed package data, or `profiles/` next to the package in a checkout."""
    from importlib.resources import files
    try:
        return files("offload_moe.profiles_data")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent.parent / "profiles"


def user_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "offload-moe" / "profiles"


def _natural(name: str):
    """'6gb' < '12gb' < '24gb' < 'cpu': digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", name)]


def _named_files(include_user: bool = True) -> dict[str, Any]:
    found = {}
    dirs = [bundled_dir()] + ([user_dir()] if include_user else [])
    for d in dirs:  # later directories shadow earlier ones
        if d.is_dir():
            for f in d.iterdir():
                if f.name.endswith(".toml"):
                    found[f.name[:-len(".toml")]] = f
    return dict(sorted(found.items(), key=lambda kv: _natural(kv[0])))


def list_profiles() -> list[str]:
    """Names `load_profile` accepts: bundled ones and the user's, smallest budget first."""
    return list(_named_files())


def bundled_profiles() -> list[Profile]:
    """The profiles shipped with offload_moe (not the user's), for `auto_profile` and plan suggestions."""
    return [_load_file(name, f, {}) for name, f in _named_files(include_user=False).items()]


def _load_file(name: str, file, overrides: dict[str, Any]) -> Profile:
    source = str(file)
    text = read_user_file(file, "profile file")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise OffloadMoeError(f"{source}: not valid TOML ({e})") from None
    return _build(name, source, raw, overrides)


def load_profile(name_or_path: str | os.PathLike, **overrides: Any) -> Profile:
    """A bundled or user profile by name ('12gb'), or a .toml file by path.

    Keyword overrides replace single keys, named like the `Profile` fields (`cache_slots=3`,
    `experts_bits="int4"`, `vram_budget="10GB"`; None leaves the key alone) and are validated
    like the file's own keys.
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or text.endswith(".toml") or "/" in text or os.sep in text:
        path = Path(text).expanduser()
        return _load_file(path.stem, path, overrides)
    named = _named_files()
    if text not in named:
        raise OffloadMoeError(f"unknown profile {text!r} (known: {', '.join(named) or 'none'}; "
                              "or give a path to a .toml file)")
    return _load_file(text, named[text], overrides)


__all__ = ["Profile", "BIT_WIDTHS", "load_profile", "list_profiles", "bundled_profiles", "user_dir", "bundled_dir"]
