"""Measurements for issue 26 (BENCHMARKS.md, "Prefix reuse and continuous batching").

    (all modes: --threads N, torch's CPU threads, default 2)
    python scripts/batching_bench.py solo [--tokens 128] [--model PATH]
        the demo's single-sequence decode tok/s through `generate` (run it under two checkouts'
        PYTHONPATH, interleaved, to compare before/after)
    python scripts/batching_bench.py chat [--model PATH] [--repeats 7] [--no-reuse]
        a five-turn chat: each turn's prompt, prefilled and reused tokens; each turn's time to first
        token (medians over the repeats); --no-reuse forgets the KV cache before every turn
    python scripts/batching_bench.py steps [--model PATH] [--streams 4] [--tokens 32] [--repeats 3]
        in process, no server: `DecodeBatch` decoding STREAMS sequences against one, tok/s of the
        decode steps after the prompts (greedy), medians over the repeats, interleaved (run it under
        two checkouts' PYTHONPATH, interleaved, to compare before/after)
    python scripts/batching_bench.py streams URL --streams 4 [--tokens 64] [--repeats 3]
        STREAMS concurrent /v1/completions requests (greedy, ignore_eos) against a running
        OpenAI-compatible server (ours or llama-server): aggregate completion tok/s over the wall
        time from the first request sent to the last answer, medians over the repeats

One JSON line per measurement on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

PROMPTS = ["ROMEO. What light through yonder window breaks?", "HAMLET. To be, or not to be",
           "KING. Now is the winter of our discontent", "MACBETH. Is this a dagger which I see before me?",
           "Friends, Romans, countrymen, lend me your ears;", "JULIET. O Romeo, Romeo, wherefore art thou Romeo?",
           "PORTIA. The quality of mercy is not strained;", "PUCK. If we shadows have offended,"]
TURNS = ["Speak, what news?", "Who comes here?", "What say you, my lord?", "Is the king dead?", "Then let us go."]


def solo(args):
    import offload_moe
    import torch
    torch.set_num_threads(args.threads)
    model = offload_moe.load(args.model, threads=args.threads)
    runs = []
    for i in range(args.repeats + 1):
        out = model.generate(PROMPTS[0], max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
        if i:   # the first run warms up
            runs.append(out.stats["generation"]["decode_tokens_per_second"])
    print(json.dumps({"what": "solo decode tok/s", "median": statistics.median(runs), "min": min(runs),
                      "max": max(runs), "runs": runs}))


def chat(args):
    import offload_moe
    from offload_moe.api.chat_session import ChatSession
    import torch
    torch.set_num_threads(args.threads)
    model = offload_moe.load(args.model, threads=args.threads)
    model.generate(PROMPTS[0], max_new_tokens=4, temperature=0)            # warm-up
    ttft = [[] for _ in TURNS]
    for rep in range(args.repeats):
        model.transformer.kv_slots.clear()
        session = ChatSession(model, temperature=0, max_new_tokens=args.tokens)
        for n, text in enumerate(TURNS):
            if args.no_reuse:   # the baseline: every turn prefills its whole prompt
                model.transformer.kv_slots.clear()
            turn = session.send(text)
            "".join(turn)
            g = turn.result.stats["generation"]
            ttft[n].append(g["prefill_seconds"])
            if rep == 0:
                print(json.dumps({"what": "chat turn", "turn": n + 1, "prompt_tokens": g["prompt_tokens"],
                                  "prefill_tokens": g["prefill_tokens"], "reused_tokens": g["reused_tokens"]}))
    for n, times in enumerate(ttft):
        print(json.dumps({"what": "chat ttft seconds", "turn": n + 1, "median": round(statistics.median(times), 4),
                          "min": round(min(times), 4), "max": round(max(times), 4)}))
    print(json.dumps({"what": "turn 5 / turn 1 ttft (medians)",
                      "ratio": round(statistics.median(ttft[4]) / statistics.median(ttft[0]), 3)}))


def steps(args):
    import offload_moe
    import torch
    from offload_moe.generation.batch import DecodeBatch
    from offload_moe.generation.generate import DecodeTiming, Sampling
    model = offload_moe.load(args.model, threads=args.threads)
    model.transformer.set_slots(args.streams)

    def run(n):
        batch = DecodeBatch(model.transformer, prefill_chunk=512)
        for i in range(n):
            batch.add(model.encode_prompt(PROMPTS[i % len(PROMPTS)]), args.tokens, Sampling(temperature=0),
                      DecodeTiming(), owner=i)
        while any(s.prefilling for s in batch.sequences):
            batch.step()
        t0, done = time.perf_counter(), 0
        while batch.sequences:
            for seq, _ in batch.step():
                done += 1
                if seq.finished:
                    batch.remove(seq)
        return done / (time.perf_counter() - t0)

    run(1), run(args.streams)   # warm-up
    rates = {1: [], args.streams: []}
    for _ in range(args.repeats):
        for n in rates:
            rates[n].append(run(n))
    one, many = statistics.median(rates[1]), statistics.median(rates[args.streams])
    print(json.dumps({"what": "in-process decode tok/s", "tree": offload_moe.__file__, "threads": torch.get_num_threads(),
                      "one": round(one, 2), f"{args.streams} streams": round(many, 2), "ratio": round(many / one, 2),
                      "runs": {n: [round(r, 2) for r in v] for n, v in rates.items()}}))


def streams(args):
    import httpx

    clients = [httpx.Client(timeout=600) for _ in range(args.streams)]   # made once: 80-160 ms each here

    def one(i, out):
        body = {"model": "any", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.tokens, "temperature": 0,
                "ignore_eos": True, "stream": False}
        r = clients[i].post(f"{args.url}/v1/completions", json=body)
        r.raise_for_status()
        out[i] = (time.perf_counter(), r.json()["usage"]["completion_tokens"])

    rates = []
    for rep in range(args.repeats + 1):
        out = {}
        threads = [threading.Thread(target=one, args=(i, out)) for i in range(args.streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = max(t for t, _ in out.values()) - t0
        tokens = sum(n for _, n in out.values())
        if rep:   # the first round warms up
            rates.append(tokens / wall)
    print(json.dumps({"what": "aggregate completion tok/s", "url": args.url, "streams": args.streams,
                      "tokens_per_stream": args.tokens, "median": statistics.median(rates), "min": min(rates),
                      "max": max(rates), "runs": rates}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["solo", "chat", "steps", "streams"])
    p.add_argument("url", nargs="?")
    p.add_argument("--model", default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-reuse", action="store_true", help="chat: forget the KV cache before every turn")
    args = p.parse_args()
    args.tokens = args.tokens or {"solo": 128, "chat": 24, "steps": 32, "streams": 64}[args.mode]
    {"solo": solo, "chat": chat, "steps": steps, "streams": streams}[args.mode](args)


if __name__ == "__main__":
    main()
