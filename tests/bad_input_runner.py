"""Run many `offload-moe` command lines in one process (torch imports once), as the console script
would: `main(argv)` with its own stdin, stdout and stderr. Reads a JSON list of
{"argv": [...], "stdin": "<latin-1 bytes>"} on stdin; writes one JSON result per case:
{"rc": int, "stderr": str, "escaped": "<exception type and message>" | null, "seconds": float,
"added_mb": float}. An exception that escapes `main` is what the console script would print as a
traceback; a case that runs past `timeout` seconds is reported as escaped "hang"; address space is
capped so a memory blow-up is an escaped MemoryError rather than a swapping machine. `added_mb` is
the case's peak resident memory above what the process held before it (VmHWM, reset through
/proc/self/clear_refs). A case with "address_space": N runs with only N more bytes of address
space than the process has mapped (as under `ulimit -v`)."""

from __future__ import annotations

import io
import json
import resource
import signal
import sys
import time
import traceback

TIMEOUT = 120
ADDRESS_SPACE = 24 * 2**30


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_case(case: dict) -> dict:
    from offload_moe.cli.main import main

    stdin = io.TextIOWrapper(io.BytesIO(case.get("stdin", "").encode("latin-1")), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = stdin, out, err
    escaped = None
    signal.signal(signal.SIGALRM, _alarm)
    limits = resource.getrlimit(resource.RLIMIT_AS)
    if case.get("address_space"):
        resource.setrlimit(resource.RLIMIT_AS, (_kib("VmSize") * 1024 + case["address_space"], limits[1]))
    _reset_peak()
    before, t0 = _kib("VmRSS"), time.monotonic()
    signal.alarm(case.get("timeout", TIMEOUT))
    try:
        rc = main(case["argv"])
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    except Hang:
        rc, escaped = -1, "hang"
    except BaseException as e:  # noqa: BLE001 - this is what the test looks for
        rc, escaped = -1, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        signal.alarm(0)
        seconds = time.monotonic() - t0
        resource.setrlimit(resource.RLIMIT_AS, limits)
        sys.stdin, sys.stdout, sys.stderr = saved
    return {"rc": rc, "stdout": out.getvalue()[-2000:], "stderr": err.getvalue(), "escaped": escaped,
            "seconds": seconds, "added_mb": (_kib("VmHWM") - before) / 1024}


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > ADDRESS_SPACE:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, hard))
    cases = json.load(sys.stdin)
    results = [run_case(c) for c in cases]
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
