"""The profile `tune` writes: its TOML text (the measurements and every setting's row in a comment
header, then the keys `load_profile` reads), its name and path, and the atomic, no-clobber write."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ..base.errors import OffloadMoeError
from ..base.runtime import fmt_bytes
from ..placement.profiles import load_profile, user_dir
from .settings import TuneResult

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _rate(bps: float) -> str:
    return fmt_bytes(bps) + "/s"


def _dur(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def measurement_lines(m: dict) -> list[str]:
    """The measurements in words, one line each (the profile header and the CLI use them)."""
    if not m:
        return ["machine not measured"]
    disk_note = "page cache dropped" if m["disk_cold"] else "page cache NOT dropped: RAM speed"
    h, i = m["expert_shape"]
    compute = ", ".join(f"{b} {_dur(s)}" for b, s in m["expert_seconds"].items())
    lines = [
        f"device {m['device']} ({_one_line(m['device_name'])}, torch {m['torch']}, {m['threads']} CPU threads)",
        f"{m['link']} copy of one expert ({fmt_bytes(m['link_copy_bytes'])}): {_rate(m['link_bytes_per_second'])}",
        f"disk read ({m['disk_filesystem']}, {disk_note}): {_rate(m['disk_read_bytes_per_second'])} "
        f"over {fmt_bytes(m['disk_bytes'])}",
        f"one expert [{h} x {i}] at batch 1 (ints: {m['expert_dtype']} activations, group {m['expert_group_size']}): "
        f"{compute}",
    ]
    if m.get("cpu_expert_seconds"):
        cpu = ", ".join(f"{b} {_dur(s)}" for b, s in m["cpu_expert_seconds"].items())
        lines.append(f"the same on the CPU in the hybrid's CPU form: {cpu}")
    return lines


def profile_text(result: TuneResult, name: str) -> str:
    """The profile TOML: a comment header with the measurements, then the keys `load_profile` reads."""
    b = result.best
    lines = [f"# {name}: written by `offload-moe tune` on {result.date}",
             f"# model {_one_line(result.model)}",
             f"# ({_one_line(result.model_summary)})"]
    lines += [f"# {line}" for line in measurement_lines(result.measurements)]
    lines.append(f"# workload: {result.tokens} tokens decoded greedily after a {result.prompt_tokens}-token "
                 f"prompt, {len(result.rows)} settings in {result.seconds:.1f} s"
                 + (f" ({result.skipped} skipped: time budget)" if result.skipped else ""))
    lines.append("#   slots  prefetch  tier   tok/s    hit rate  moved")
    for r in result.rows:
        mark = (f"  (median of {len(r.runs)} runs)" if len(r.runs) > 1 else "") + ("  <- chosen" if r is b else "")
        if r.error:
            lines.append(f"#   {r.slots:>5}  {r.prefetch:>8}  {r.tier:<5}  {r.error}")
            continue
        lines.append(f"#   {r.slots:>5}  {r.prefetch:>8}  {r.tier:<5}  {r.decode_tokens_per_second:>7.1f}  "
                     f"{r.hit_rate:>8.1%}  {fmt_bytes(r.bytes_moved)}{mark}")
    for note in result.notes:
        lines.append(f"# note: {_one_line(note)}")
    on_cuda = result.device_type == "cuda"
    lines += [
        f'device = "{result.device_type}"',
    ]
    if on_cuda:
        lines.append(f'vram_budget = "{result.vram_budget / 1e9:.2f}GB"   # free VRAM when tuned')
    lines += [
        f'reserve = "{"1GB" if on_cuda else "2GB"}"',
        "context_length = 4096",
        f"cache_slots = {b.slots}",
        f"prefetch = {b.prefetch}",
        f'offload = "{b.tier}"',
        'ram_budget = "auto"',
        "",
        "[bits]",
        f'experts = "{result.bits["experts"]}"',
        f'attention = "{result.bits["attention"]}"',
        f'embeddings = "{result.bits["embeddings"]}"',
    ]
    return "\n".join(lines) + "\n"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".toml") or name == "auto":
        raise OffloadMoeError(f"profile name {name!r}: expected letters, digits, '.', '_' or '-' without "
                              ".toml (and not 'auto'), e.g. tuned")
    return name


def profile_path(name: str, directory: str | Path | None = None) -> Path:
    return Path(directory if directory is not None else user_dir()) / f"{check_name(name)}.toml"


def write_profile(result: TuneResult, name: str = "tuned", directory: str | Path | None = None,
                  force: bool = False) -> Path:
    """Write `<directory>/<name>.toml` (default directory: the user profile directory) atomically;
    an existing file is an error unless `force`. The text is validated by `load_profile` first."""
    path = profile_path(name, directory)
    if path.exists() and not force:
        raise _exists(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".toml", dir=path.parent)
    except OSError as e:
        raise OffloadMoeError(f"{path.parent}: cannot write a profile there ({e.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(profile_text(result, name))
            f.flush()
            os.fsync(f.fileno())
        load_profile(Path(tmp))  # a file that would not load is never put in place
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name appeared meanwhile: never clobbers
            except FileExistsError:
                raise _exists(path) from None
            except OSError:  # no hard links on this filesystem
                if path.exists():
                    raise OffloadMoeError(f"{path} exists; pass --force to overwrite it") from None
                os.replace(tmp, path)
    except OSError as e:
        raise OffloadMoeError(f"{path}: cannot write the profile ({e.strerror})") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return path


def _exists(path: Path) -> OffloadMoeError:
    return OffloadMoeError(f"{path} exists; pass --force to overwrite it, or choose another --name")
