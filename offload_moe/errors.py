"""The one exception type meant for users.

Anything raised as `OffloadMoeError` carries a short message that names the file, key or value at
fault and what was expected; the CLI prints it on one line and exits non-zero. Any other exception
is a bug in offload_moe and may surface as a traceback.
"""


class OffloadMoeError(Exception):
    """A user-facing error: bad checkpoint, bad profile, impossible budget, bad argument."""


def read_user_file(path, what: str) -> str:
    """The text of a file the user named, or a one-line error saying which file and why not."""
    from .user_files import regular_file  # a FIFO would hang read_text, a directory would raise

    regular_file(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OffloadMoeError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OffloadMoeError(f"{path}: cannot read {what} ({e})") from None
