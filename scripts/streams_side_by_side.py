"""Concurrent streams on one GGUF file: our server against llama.cpp's, interleaved (issue 26, acceptance 2).

    python scripts/streams_side_by_side.py MODEL.gguf [--threads 2] [--streams 4] [--tokens 32]
        [--rounds 3] [--context 512] [--llama-cpp DIR] [--only ours|llama.cpp] [--json OUT]

Starts `offload-moe serve --parallel S` and `llama-server -np S` (both with --threads T, a context of
`--context` tokens per slot) on the same file, waits for both to answer /health, then runs `rounds`
rounds after a warm-up round; each round measures, for each server in turn (the order alternates by
round), S concurrent non-streamed /v1/completions requests and then one request alone: greedy,
`ignore_eos`, `--tokens` tokens each, different prompts. Aggregate tok/s = completion tokens over
the wall time from the first request sent to the last answer. Prints one JSON line per measurement
and, at the end, medians with min-max per server and mode, the ratios, and whether each stream's text
from our S-stream rounds equals that prompt's text when it runs alone on our server (greedy: it must).

llama.cpp's directory (holding build/bin/llama-server) comes from --llama-cpp or $LLAMA_CPP_DIR.
Both servers stay up for the whole run (idle while the other is measured); both are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPTS = ["ROMEO. What light through yonder window breaks?", "HAMLET. To be, or not to be",
           "KING. Now is the winter of our discontent", "MACBETH. Is this a dagger which I see before me?",
           "Friends, Romans, countrymen, lend me your ears;", "JULIET. O Romeo, Romeo, wherefore art thou Romeo?",
           "PORTIA. The quality of mercy is not strained;", "PUCK. If we shadows have offended,"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, cmd: list[str], url: str, log: Path, timeout: float = 600) -> subprocess.Popen:
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode} before answering; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise SystemExit(f"{name} did not answer /health within {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


CLIENTS: dict[int, httpx.Client] = {}   # one per stream, made before any timing (see `client`)


def client(i: int) -> httpx.Client:
    """Stream i's HTTP client, made once: making one (its SSL context) costs 80-160 ms on a busy machine,
    which `httpx.post` would pay inside every timed request."""
    if i not in CLIENTS:
        CLIENTS[i] = httpx.Client(timeout=1800)
    return CLIENTS[i]


def complete(url: str, prompt: str, tokens: int, i: int = 0) -> tuple[float, int, str]:
    body = {"model": "any", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": False}
    r = client(i).post(f"{url}/v1/completions", json=body)
    r.raise_for_status()
    j = r.json()
    return time.perf_counter(), j["usage"]["completion_tokens"], j["choices"][0]["text"]


def streams(url: str, n: int, tokens: int) -> tuple[float, list[str]]:
    """n concurrent requests -> (aggregate completion tok/s, their texts in prompt order)."""
    out: dict[int, tuple[float, int, str]] = {}
    errors: list[BaseException] = []

    def one(i):
        try:
            out[i] = complete(url, PROMPTS[i % len(PROMPTS)], tokens, i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for i in range(n):
        client(i)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = max(t for t, _, _ in out.values()) - t0
    return sum(k for _, k, _ in out.values()) / wall, [out[i][2] for i in range(n)]


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--context", type=int, default=512, help="tokens per slot (default 512)")
    p.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"))
    p.add_argument("--only", choices=["ours", "llama.cpp"])
    p.add_argument("--json", help="write the summary here too")
    args = p.parse_args()
    S, T = args.streams, args.threads
    servers = {}
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    if args.only != "llama.cpp":
        port = free_port()
        servers["ours"] = ([sys.executable, "-m", "offload_moe", "serve", "--model", args.model, "--threads", str(T),
                            "--parallel", str(S), "--context-length", str(args.context), "--port", str(port)],
                           f"http://127.0.0.1:{port}")
    if args.only != "ours":
        if not args.llama_cpp:
            raise SystemExit("llama.cpp's directory: --llama-cpp DIR or $LLAMA_CPP_DIR (or --only ours)")
        port = free_port()
        servers["llama.cpp"] = ([str(Path(args.llama_cpp) / "build/bin/llama-server"), "-m", args.model, "-t", str(T),
                                 "-tb", str(T), "-np", str(S), "-c", str(args.context * S), "--port", str(port)],
                                f"http://127.0.0.1:{port}")
    procs = {}
    try:
        for name, (cmd, url) in servers.items():
            procs[name] = start(name, cmd, url, logs / f"streams-{name}-{os.getpid()}.log")
        results = {(name, mode): [] for name in servers for mode in ("streams", "one")}
        batched_texts: list[list[str]] = []
        for rnd in range(args.rounds + 1):
            order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
            for name in order:
                url = servers[name][1]
                rate_n, texts = streams(url, S, args.tokens)
                rate_1, _ = streams(url, 1, args.tokens)
                if rnd == 0:   # the warm-up round
                    continue
                if name == "ours":
                    batched_texts.append(texts)
                results[(name, "streams")].append(rate_n)
                results[(name, "one")].append(rate_1)
                print(json.dumps({"round": rnd, "server": name, f"{S} streams tok/s": round(rate_n, 2),
                                  "1 stream tok/s": round(rate_1, 2)}), flush=True)
        report = {"model": args.model, "threads": T, "streams": S, "tokens_per_stream": args.tokens,
                  "rounds": args.rounds,
                  **{f"{name} {mode}": summary(v) for (name, mode), v in results.items()}}
        if "ours" in servers:
            alone = [complete(servers["ours"][1], PROMPTS[i % len(PROMPTS)], args.tokens)[2] for i in range(S)]
            report["ours: each stream's text equals its solo run"] = all(t == alone for t in batched_texts)
            report[f"ours {S} streams / ours 1 stream"] = round(
                statistics.median(results[("ours", "streams")]) / statistics.median(results[("ours", "one")]), 2)
        if len(servers) == 2:
            report[f"ours / llama.cpp, {S} streams"] = round(
                statistics.median(results[("ours", "streams")]) / statistics.median(results[("llama.cpp", "streams")]), 2)
        print(json.dumps(report, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    finally:
        for proc in procs.values():
            stop(proc)


if __name__ == "__main__":
    main()
