"""offload_moe and llama.cpp side by side on one real-size GGUF file: same file, same threads.

Each round runs, in an order that rotates from round to round (so load changes hit every engine alike):
- offload_moe: one fresh Python process: `offload_moe.load(path, device="cpu")`, one token from a short
  prompt (time to first token: from the parent's spawn to that token), then a decode of --decode-tokens
  tokens and one prefill of each --prefill length, read from `model.stats`, each after a warm-up run
  of its kind (as llama-bench warms up before each test; the prefill's warm-up on other tokens, so
  nothing of it is reused);
- llama.cpp, with its default weight repack and with `--repack 0` / `--no-repack` (weights used where
  the file maps them): a fresh `llama-completion -n 1` process (time to first token: spawn to exit), then
  `llama-bench -p 128,512 -n TOKENS -r 1` for decode and prefill.
The parent samples every process's /proc/PID/status (RssAnon: heap, repacked or copied weights, KV
cache; RssFile: mapped file pages, which the kernel may reclaim) every 20 ms and keeps the peaks.
With --cgroup-mem each process runs inside a fresh memory cgroup of that limit (v1 or v2, created
under this process's own cgroup, removed after), and the file's pages are dropped from the page cache
before each run so they are charged to it: a smaller machine, page cache counted. --cold drops them
before every process without a cgroup too: each engine reads the file as its own mapping does (ours
asks for huge pages), none finds the other's pages cached.

    python scripts/realsize_bench.py FILE.gguf --llama-bin LLAMA_CPP/build/bin --threads 2 --rounds 3

(llama-completion may need building: `cmake --build build --target llama-completion` in llama.cpp.)

One markdown table comes out: medians, (min–max) over rounds, and ratios of medians. A process that
fails (e.g. killed by the cgroup's OOM killer) counts as a missing value and is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends."

OURS = r"""
import json, os, sys, time
spawned, path, threads, decode, prefills = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import torch
import offload_moe
torch.set_num_threads(threads)

def rss():
    f = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith("Rss"))
    return {k: int(v.split()[0]) * 1024 for k, v in f.items()}

start = time.time()
model = offload_moe.load(path, device="cpu", threads=threads)   # not "auto": the rounds must compare like with like
loaded, after_load = time.time(), rss()
model.generate(sys.argv[6], max_new_tokens=1, temperature=0, ignore_eos=True)
first = time.time()
out = {"load_s": loaded - start, "import_s": start - spawned, "ttft_s": first - spawned, "after_load": after_load,
       "settings": model.settings.as_dict() if hasattr(model.settings, "as_dict") else str(model.settings),
       "source": os.path.dirname(offload_moe.__file__)}
ids = list(range(10, 26))
model.generate(ids, max_new_tokens=1, temperature=0, ignore_eos=True)   # the prompt, so the decode below reuses it
model.generate(ids, max_new_tokens=decode + 1, temperature=0, ignore_eos=True)   # warm-up, as llama-bench's
if hasattr(model.experts, "reset_stats"):
    model.experts.reset_stats()
model.generate(ids, max_new_tokens=decode + 1, temperature=0, ignore_eos=True)
out["decode"] = model.stats["generation"]["decode_tokens_per_second"]
e = model.stats["experts"]
if "hit_rate" in e:  # the expert cache over the decode: hits, file reads, what read-ahead did
    out["experts"] = {k: e.get(k) for k in ("hit_rate", "hits", "misses", "prefetch_issued", "prefetch_used",
                                            "stall_seconds", "bytes_moved", "slots_per_layer", "bytes_per_expert")}
    out["experts"]["tokens"] = model.stats["generation"]["new_tokens"]
for n in [int(v) for v in prefills.split(",") if v]:
    model.generate(list(range(2000, 2000 + n)), max_new_tokens=1, temperature=0, ignore_eos=True)   # warm-up
    model.generate(list(range(10, 10 + n)), max_new_tokens=1, temperature=0, ignore_eos=True)
    out[f"prefill{n}"] = model.stats["generation"]["prefill_tokens_per_second"]
print("RESULT " + json.dumps(out), flush=True)
"""


# ---------------------------------------------------------------- memory: sampling and cgroups

@dataclass
class Peaks:
    anon: int = 0
    file: int = 0

    def add(self, other: "Peaks") -> None:
        self.anon, self.file = max(self.anon, other.anon), max(self.file, other.file)


def sample_rss(pid: int, peaks: Peaks, stop: threading.Event, every: float = 0.02) -> None:
    """Keep the largest RssAnon and RssFile of process `pid` until `stop` is set or it is gone."""
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(path) as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith("Rss"))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return
        if "RssAnon" in fields:
            peaks.anon = max(peaks.anon, int(fields["RssAnon"].split()[0]) * 1024)
            peaks.file = max(peaks.file, int(fields["RssFile"].split()[0]) * 1024)
        stop.wait(every)


class MemoryCgroup:
    """A fresh memory cgroup (v1 or v2) under this process's own, limited to `limit` bytes."""

    def __init__(self, limit: int):
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        v1 = [l.split(":", 2)[2] for l in lines if l.split(":", 2)[1] == "memory"]
        name = f"realsize-bench-{os.getpid()}-{time.monotonic_ns()}"
        if v1 and Path("/sys/fs/cgroup/memory").is_dir():
            self.dir = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/") / name
            self.dir.mkdir()
            (self.dir / "memory.limit_in_bytes").write_text(str(limit))
            self.peak_file = "memory.max_usage_in_bytes"
        else:
            own = next(l.split(":", 2)[2] for l in lines if l.startswith("0::"))
            self.dir = Path("/sys/fs/cgroup") / own.lstrip("/") / name
            self.dir.mkdir()
            (self.dir / "memory.max").write_text(str(limit))
            (self.dir / "memory.swap.max").write_text("0") if (self.dir / "memory.swap.max").exists() else None
            self.peak_file = "memory.peak"

    def enter(self) -> None:
        """preexec_fn: move the child into the cgroup before it execs."""
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        p = self.dir / self.peak_file
        return int(p.read_text()) if p.exists() else None

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def drop_from_page_cache(path: str) -> None:
    """Evict the file's clean pages so a cgroup run reads (and is charged for) them itself."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


# ---------------------------------------------------------------- one run of one engine

@dataclass
class Run:
    values: dict = field(default_factory=dict)    # measure -> value
    peaks: Peaks = field(default_factory=Peaks)
    cgroup_peak: int | None = None
    error: str | None = None


COLD = False   # --cold: every process starts with the file's pages dropped from the page cache


def run_process(cmd: list[str], *, cgroup_limit: int | None, file: str, env=None, timeout: float,
                cwd: Path | None = None) -> tuple:
    """(stdout, stderr, returncode, seconds from spawn to exit, Peaks, cgroup peak or None)."""
    cgroup = MemoryCgroup(cgroup_limit) if cgroup_limit else None
    if cgroup or COLD:
        drop_from_page_cache(file)
    peaks, stop = Peaks(), threading.Event()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd,
                                preexec_fn=cgroup.enter if cgroup else None)
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, peaks, stop), daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            err.write(f"\ntimed out after {timeout:.0f} s")
        except BaseException:  # interrupted: leave no process behind
            proc.kill()
            proc.wait()
            raise
        seconds = time.time() - start
        stop.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    cpeak = None
    if cgroup:
        cpeak = cgroup.peak()
        cgroup.remove()
    return stdout, stderr, rc, seconds, peaks, cpeak, start


def last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:200] if lines else ""


def ours(args) -> Run:
    env = dict(os.environ, PYTHONPATH=f"{args.ours_src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    spawn = time.time()
    stdout, stderr, rc, seconds, peaks, cpeak, _ = run_process(
        [sys.executable, "-c", OURS, repr(spawn), args.gguf, str(args.threads), str(args.decode_tokens),
         ",".join(map(str, args.prefill)), PROMPT], cgroup_limit=args.cgroup_mem, file=args.gguf, env=env,
        timeout=args.timeout, cwd=args.ours_src)  # `python -c` puts its cwd first on sys.path
    run = Run(peaks=peaks, cgroup_peak=cpeak)
    result = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if rc or not result:
        run.error = f"exit {rc}: {last_line(stderr)}"
        return run
    r = json.loads(result[-1].removeprefix("RESULT "))
    run.values = {"ttft": r["ttft_s"], "load": r["load_s"], "decode": r["decode"],
                  **{f"prefill{n}": r[f"prefill{n}"] for n in args.prefill},
                  "anon_after_load": r["after_load"]["RssAnon"]}
    run.settings = {**r["settings"], "offload_moe": r["source"]} if isinstance(r["settings"], dict) else r["settings"]
    run.experts = r.get("experts")
    return run


def llama(args, repack: bool) -> Run:
    bin_dir = args.llama_bin
    flag = [] if repack else ["--no-repack"]
    stdout, stderr, rc, seconds, peaks, cpeak, _ = run_process(
        [str(bin_dir / "llama-completion"), "-m", args.gguf, "-t", str(args.threads), "-p", PROMPT, "-n", "1",
         "-no-cnv", "--no-warmup", "-c", str(args.context), "--temp", "0", *flag],
        cgroup_limit=args.cgroup_mem, file=args.gguf, timeout=args.timeout)
    run = Run(peaks=peaks, cgroup_peak=cpeak)
    if rc:
        run.error = f"llama-completion exit {rc}: {last_line(stderr)}"
        return run
    run.values["ttft"] = seconds
    prompts = ",".join(map(str, args.prefill)) or "0"   # no prefill asked: decode only
    stdout, stderr, rc, _, peaks, cpeak, _ = run_process(
        [str(bin_dir / "llama-bench"), "-m", args.gguf, "-t", str(args.threads), "-p", prompts,
         "-n", str(args.decode_tokens), "-r", "1", "--repack", "1" if repack else "0", "-o", "json"],
        cgroup_limit=args.cgroup_mem, file=args.gguf, timeout=args.timeout)
    run.peaks.add(peaks)
    if cpeak is not None:
        run.cgroup_peak = max(run.cgroup_peak or 0, cpeak)
    if rc:
        run.error = f"llama-bench exit {rc}: {last_line(stderr)}"
        return run
    for test in json.loads(stdout):
        if test["n_gen"] == 0:
            run.values[f"prefill{test['n_prompt']}"] = test["avg_ts"]
        elif test["n_prompt"] == 0:
            run.values["decode"] = test["avg_ts"]
    return run


# ---------------------------------------------------------------- the table

ENGINES = {"offload_moe": lambda a: ours(a), "llama.cpp": lambda a: llama(a, True),
           "llama.cpp --repack 0": lambda a: llama(a, False)}
GiB = 1 << 30


def rows(prefill: list[int]) -> list[tuple[str, str, float, bool]]:
    """(key, label, scale, higher is better)."""
    return [("ttft", "time to first token, fresh process (s)", 1, False),
            ("decode", "decode (tok/s)", 1, True),
            *[(f"prefill{n}", f"prefill {n} tokens (tok/s)", 1, True) for n in prefill],
            ("peak_anon", "peak RssAnon (GiB)", GiB, False),
            ("peak_file", "peak RssFile (GiB)", GiB, False),
            ("anon_after_load", "RssAnon after load (GiB)", GiB, False),
            ("cgroup_peak", "cgroup peak usage (GiB)", GiB, False)]


def cell(values: list[float], scale: float) -> str:
    if not values:
        return "–"
    v = [x / scale for x in values]
    med = statistics.median(v)
    fmt = ".2f" if med < 10 else ".1f"
    return f"{med:{fmt}} ({min(v):{fmt}}–{max(v):{fmt}})" if len(v) > 1 else f"{med:{fmt}}"


def table(results: dict[str, list[Run]], prefill: list[int]) -> str:
    engines = list(results)
    base = "offload_moe"
    others = [e for e in engines if e != base]
    head = "| measure | " + " | ".join(engines) + "".join(f" | {base} / {e}" for e in others if base in engines) + " |"
    lines = [head, "|---|" + "---:|" * (len(engines) + (len(others) if base in engines else 0))]
    for key, label, scale, higher in rows(prefill):
        got = {}
        for e in engines:
            vals = []
            for r in results[e]:
                v = {"peak_anon": r.peaks.anon or None, "peak_file": r.peaks.file or None,
                     "cgroup_peak": r.cgroup_peak}.get(key, r.values.get(key))
                if v is not None and (r.error is None or key in ("peak_anon", "peak_file", "cgroup_peak")):
                    vals.append(v)
            got[e] = vals
        if not any(got.values()):
            continue
        line = f"| {label} | " + " | ".join(cell(got[e], scale) for e in engines)
        if base in engines:
            for e in others:
                if got[base] and got[e]:
                    ratio = statistics.median(got[base]) / statistics.median(got[e])
                    line += f" | {ratio:.2f}×"
                else:
                    line += " | –"
        lines.append(line + " |")
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, list[Run]]) -> None:
    path.write_text(json.dumps({e: [{"values": r.values, "peak_anon": r.peaks.anon, "peak_file": r.peaks.file,
                                     "cgroup_peak": r.cgroup_peak, "error": r.error,
                                     **({"experts": r.experts} if getattr(r, "experts", None) else {})} for r in runs]
                                for e, runs in results.items()}, indent=1))


def machine() -> str:
    mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} CPUs ({cpu}), {int(mem.split()[1]) / (1 << 20):.1f} GiB RAM, {platform.platform()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", help="GGUF file (e.g. from scripts/make_real_gguf.py)")
    p.add_argument("--llama-bin", type=Path, required=True, help="directory holding llama-bench and llama-completion")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prefill", default="128,512", help="prompt lengths for prefill, comma-separated")
    p.add_argument("--context", type=int, default=4096, help="llama-completion's -c (its KV cache)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}")
    p.add_argument("--cold", action="store_true", help="drop the file's cached pages before every process")
    p.add_argument("--cgroup-mem", help="run every process in a memory cgroup of this size (e.g. 8G)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one process may run")
    p.add_argument("--json", type=Path, help="also write every run's figures here")
    p.add_argument("--ours-src", type=Path, default=ROOT,
                   help="the offload_moe source tree to run (default: this checkout; e.g. an export of main)")
    args = p.parse_args()
    global COLD
    COLD = args.cold
    args.prefill = [int(n) for n in args.prefill.split(",") if n]
    args.gguf = os.path.abspath(args.gguf)
    args.cgroup_mem = parse_bytes(args.cgroup_mem) if args.cgroup_mem else None
    engines = [e.strip() for e in args.engines.split(",")]
    for e in engines:
        if e not in ENGINES:
            sys.exit(f"realsize_bench: --engines: {e!r} is not one of {', '.join(ENGINES)}")
    if not Path(args.gguf).is_file():
        sys.exit(f"realsize_bench: {args.gguf}: no such file")
    for exe in ("llama-bench", "llama-completion"):
        if any(e.startswith("llama.cpp") for e in engines) and not (args.llama_bin / exe).is_file():
            sys.exit(f"realsize_bench: {args.llama_bin / exe}: not found (--llama-bin: llama.cpp's build/bin)")

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"file: {args.gguf} ({Path(args.gguf).stat().st_size / 1e9:.2f} GB)")
    print(f"machine: {machine()}; commit {commit}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"threads {args.threads}, rounds {args.rounds}, decode {args.decode_tokens} tokens, "
          f"prefill {args.prefill}" + (f", memory cgroup {args.cgroup_mem / GiB:.1f} GiB" if args.cgroup_mem else ""))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results: dict[str, list[Run]] = {e: [] for e in engines}
    for r in range(args.rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for e in order:
            run = ENGINES[e](args)
            results[e].append(run)
            if args.json:  # after every run, so an interrupted benchmark keeps what it measured
                write_json(args.json, results)
            shown = ", ".join(f"{k} {v / GiB if 'anon' in k else v:.2f}" for k, v in run.values.items())
            print(f"round {r + 1} {e:21s} {shown}; peak anon {run.peaks.anon / GiB:.2f} GiB, "
                  f"file {run.peaks.file / GiB:.2f} GiB" + (f"; FAILED {run.error}" if run.error else ""), flush=True)
            if getattr(run, "experts", None):
                x = run.experts
                print(f"    expert cache over the decode: hit rate {x['hit_rate']:.1%}, {x['misses']} misses "
                      f"({x['bytes_moved'] / 1e9:.2f} GB read), read ahead {x['prefetch_used']}/{x['prefetch_issued']} "
                      f"used, stall {x['stall_seconds'] / max(1, x['tokens']) * 1e3:.0f} ms/token", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    settings = next((getattr(r, "settings", None) for r in results.get("offload_moe", []) if hasattr(r, "settings")), None)
    if settings:
        print(f"offload_moe settings: {settings}\n")
    print(table(results, args.prefill))


if __name__ == "__main__":
    main()
