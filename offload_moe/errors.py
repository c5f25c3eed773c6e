"""The one exception type meant for users.

Anything raised as `OffloadMoeError` carries a short message that names the file, key or value at
fault and what was expected; the CLI prints it on one line and exits non-zero. Any other exception
is a bug in offload_moe and may surface as a traceback.
"""


class OffloadMoeError(Exception):
    """A user-facing error: bad checkpoint, bad profile, impossible budget, bad argument."""
