"""Files the user named: read only regular files (a FIFO would hang, a directory would raise), and
never replace an existing one unless asked (`force`).

Without `force` the file is created with O_EXCL, so a file that appears between the check and the
write is not clobbered either; with `force` the new text goes to a temporary file beside it and is
renamed over the old one, so a failure never leaves half a file. Bottom layer.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from pathlib import Path

from .errors import OffloadMoeError, regular_file  # noqa: F401  (re-exported)


def refuse_existing(path: Path, force: bool, hint: str = "pass --force to overwrite it") -> None:
    if not force and os.path.lexists(path):
        raise OffloadMoeError(f"{path}: already exists; {hint}")


def write_text(path: str | Path, text: str, *, force: bool = False, what: str = "file",
               hint: str = "pass --force to overwrite it") -> Path:
    path = Path(path).expanduser()
    refuse_existing(path, force, hint)
    data = text.encode("utf-8")
    try:
        if not force:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return path
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except FileExistsError:
        raise OffloadMoeError(f"{path}: already exists; {hint}") from None
    except OSError as e:
        raise OffloadMoeError(f"{path}: cannot write the {what} ({e.strerror or e})") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_stdin(stream, what: str = "stdin") -> str:
    """All of a text stream's bytes as UTF-8 text, or one line saying where it is not UTF-8."""
    data = getattr(stream, "buffer", stream).read()
    if isinstance(data, str):  # a stream without bytes underneath (tests' StringIO)
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OffloadMoeError(f"{what}: byte {e.start} ({data[e.start:e.start + 1]!r}) is not valid UTF-8 "
                              "(expected UTF-8 text)") from None


def read_json_object(file: Path, what: str) -> dict:
    """A user's JSON file that must hold an object (config.json, tokenizer_config.json): a regular file,
    UTF-8, a JSON object at the top; anything else is one line naming the file."""
    regular_file(file, what)
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as e:
        raise OffloadMoeError(f"{file}: cannot read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise OffloadMoeError(f"{file}: not valid UTF-8 JSON ({str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise OffloadMoeError(f"{file}: expected a JSON object at the top level")
    return raw


def advise_huge(m: mmap.mmap) -> None:
    """Ask for huge pages on a weights' mapping (MADV_HUGEPAGE, where the kernel has transparent huge
    pages; `OFFLOAD_MOE_HUGEPAGES=0` leaves the mapping as it is): the file's pages this mapping reads
    into the page cache come in large folios, physically contiguous, so streaming the weights once per
    token takes far fewer TLB misses. Pages already cached stay as they are. Measured: decode of a
    Qwen3-30B-A3B-shape Q4_0 file read through such a mapping 1.25x the same file read in 4 KB pages
    (BENCHMARKS.md, "Huge pages for the mapped weights")."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and os.environ.get("OFFLOAD_MOE_HUGEPAGES", "1") != "0":
        try:
            m.madvise(advice)
        except OSError:  # no transparent huge pages here: the mapping works as it is
            pass
