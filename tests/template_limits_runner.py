"""Render chat templates one after another in this process, as `Tokenizer.render_chat` does, and
report for each: the error (type and message) or the rendered length, the seconds it took, and the
peak memory it added (VmHWM, reset through /proc/self/clear_refs before each case). Reads a JSON
list of templates on stdin, writes a JSON list of results. The address space is capped, so a
blow-up is a MemoryError here rather than a swapping machine."""

from __future__ import annotations

import json
import resource
import sys
import time


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    from offload_moe.generation.text import Tokenizer

    resource.setrlimit(resource.RLIMIT_AS, (_kib("VmSize") * 1024 + 2 * 2**30, resource.RLIM_INFINITY))
    results = []
    for template in json.load(sys.stdin):
        tok = Tokenizer.from_parts(None, "<s>", "</s>", template, "ckpt/tokenizer_config.json")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _kib("VmRSS")
        t0 = time.monotonic()
        try:
            out = tok.render_chat([{"role": "user", "content": "hi"}])
            result = {"error": None, "chars": len(out)}
        except BaseException as e:  # noqa: BLE001 - the test looks at what escaped
            result = {"error": f"{type(e).__name__}: {e}"}
        result.update(seconds=time.monotonic() - t0, added_mb=(_kib("VmHWM") - before) / 1024)
        results.append(result)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
