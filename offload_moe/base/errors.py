"""The one exception type meant for users.

Anything raised as `OffloadMoeError` carries a short message that names the file, key or value at
fault and what was expected; the CLI prints it on one line and exits non-zero. Any other exception
is a bug in offload_moe and may surface as a traceback.
"""

from __future__ import annotations

import os
import stat


class OffloadMoeError(Exception):
    """A user-facing error: bad checkpoint, bad profile, impossible budget, bad argument."""


def read_user_file(path, what: str) -> str:
    """The text of a file the user named, or a one-line error saying which file and why not."""
    regular_file(path, what)  # a FIFO would hang read_text, a directory would raise
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OffloadMoeError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OffloadMoeError(f"{path}: cannot read {what} ({e})") from None


def regular_file(path: Path, what: str) -> os.stat_result:
    """stat() a file we are about to open: it must be a regular file (a FIFO would hang the open)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise OffloadMoeError(f"{path}: {what} not found") from None
    except OSError as e:
        raise OffloadMoeError(f"{path}: cannot read {what} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise OffloadMoeError(f"{path}: {what} is {kind} (expected a file)")
    return st
