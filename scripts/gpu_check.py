"""Measurements for scripts/gpu_check.sh, one subcommand per step; each writes one JSON file.

  env      versions, device, triton, the packages the run depends on
  h2d      pinned host->device GB/s for one Mixtral int4 expert: PyTorch's pinned allocator, our
           cudaHostRegister'd pages (experts/pinned.py), and pageable memory
  triton   the Triton kernels' GB/s per bit width on Mixtral-size matrices (w1 [14336, 4096],
           w2 [4096, 14336]) at batch 1..16, against this run's HBM bandwidth (device copy, and a
           read-only reduction), dense bf16 F.linear, and dequantize+matmul; L2 is defeated by
           cycling over enough copies; kernel time comes from CUDA-graph replays (no launch gaps),
           host launch cost is measured apart
  syncs    host syncs per decode step (torch.cuda.set_sync_debug_mode("warn"), every warning
           counted, by source line) on a small offloaded int4 synthetic Mixtral

`--tiny` runs the same code at toy sizes (the CPU check in tests/test_gpu_check.py); without CUDA
each step records {"skipped": reason} for what needs a GPU and still exercises its code path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from offload_moe import Placement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CUDA = torch.cuda.is_available()
MIXTRAL = {"w1": (14336, 4096), "w2": (4096, 14336)}
TINY = {"w1": (256, 128), "w2": (128, 256)}


def write(path: Path, data: dict, echo: bool = True) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
    if echo:
        print(json.dumps(data)[:3000])


def step_env(args) -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "cuda_available": CUDA, "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - report whatever went wrong
        out["triton"] = f"unavailable: {e}"
    for pkg in ("numpy", "safetensors", "tokenizers", "rich", "jinja2", "gguf", "transformers", "accelerate",
                "bitsandbytes", "pytest", "hypothesis", "pexpect", "openai", "starlette", "httpx"):
        try:
            mod = __import__(pkg)
            out[pkg] = getattr(mod, "__version__", "present")
        except Exception:  # noqa: BLE001
            out[pkg] = None
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, sm_count=p.multi_processor_count, total_memory=p.total_memory,
                   capability=f"{p.major}.{p.minor}", device_count=torch.cuda.device_count(),
                   l2_bytes=getattr(p, "L2_cache_size", None))
        try:
            out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                                                "clocks.max.mem,power.limit", "--format=csv"],
                                               capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:  # noqa: BLE001
            out["nvidia_smi"] = f"unavailable: {e}"
    else:
        out["device"] = "cpu only: CUDA steps are skipped"
    return out


def _expert_bytes(tiny: bool) -> int:
    from offload_moe.placement.planner import weight_bytes
    (i, h) = (TINY if tiny else MIXTRAL)["w1"]
    return 2 * weight_bytes(i, h, "int4") + weight_bytes(h, i, "int4")


def _time_copies(src: list[torch.Tensor], dst: torch.Tensor, rounds: int) -> list[float]:
    """GB/s of `rounds` rounds, each copying every source once into dst (events on a side stream)."""
    stream = torch.cuda.Stream()
    out = []
    with torch.cuda.stream(stream):
        for _ in range(rounds):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(stream)
            for s in src:
                dst.copy_(s, non_blocking=True)
            b.record(stream)
            b.synchronize()
            out.append(sum(s.numel() for s in src) / (a.elapsed_time(b) / 1e3) / 1e9)
    return out


def step_h2d(args) -> dict:
    from offload_moe.experts.pinned import PinnedArena, Pow2Chunks, Registered, default_strategy
    nbytes = _expert_bytes(args.tiny)
    n = 2 if args.tiny else 8
    out = {"bytes_per_copy": nbytes, "copies_per_round": n}
    if not CUDA:
        out["skipped"] = "no CUDA device: host->device bandwidth needs a GPU"
        return out
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    strategy = default_strategy()
    out["default_strategy"] = strategy.name
    arenas = {"registered": lambda: PinnedArena(Registered(), n, nbytes),
              "torch_pinned_pow2": lambda: PinnedArena(Pow2Chunks(), n, nbytes)}
    for name, make in arenas.items():
        try:
            arena = make()
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": str(e)}
            continue
        for t in arena.items:
            t.fill_(1)
        gbps = _time_copies(arena.items, dst, 5)
        out[name] = {"gbps_median": statistics.median(gbps), "gbps_all": gbps,
                     "pinned_bytes": arena.pinned_bytes, "data_bytes": n * nbytes,
                     "is_pinned": bool(arena.items[0].is_pinned())}
        arena.close()
    pageable = [torch.ones(nbytes, dtype=torch.uint8) for _ in range(n)]
    out["pageable"] = {"gbps_median": statistics.median(_time_copies(pageable, dst, 3))}
    return out


# ---- Triton ----

def _hbm(tiny: bool) -> dict:
    n = (1 << 20) if tiny else (1 << 31)
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    f = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda")
    res = {}
    for name, fn, moved in (("copy_read_write", lambda: b.copy_(a), 2 * n), ("sum_read", lambda: f.sum(), n)):
        fn()
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        res[name] = {"gbps_median": moved / statistics.median(times) / 1e9, "bytes": moved}
    return res


def _graph_time(calls, reps: int = 5) -> float:
    """Seconds per call: the calls captured once in a CUDA graph, replayed `reps` times (median)."""
    for c in calls:  # warm-up (autotuning happens here, outside the capture)
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / len(calls))
    return statistics.median(times)


def _random_qweight(shape, bits: int, device):
    from offload_moe.kernels import QuantizedWeight
    from offload_moe.kernels.pack import packed_cols
    out_f, in_f = shape
    packed = torch.randint(0, 256, (out_f, packed_cols(in_f, bits)), dtype=torch.uint8, device=device)
    scales = (torch.rand(out_f, in_f // 64, device=device) * 1e-3 + 1e-4).half()
    zeros = torch.full((out_f, in_f // 64), ((1 << bits) - 1) / 2, dtype=torch.float16, device=device)
    return QuantizedWeight(packed, scales, zeros, bits, 64, shape)


def _measure_kernel(kt, ws, shape, bits: int, batch: int, device: str, hbm) -> dict:
    """One (bits, matrix, batch): error against float64, and on CUDA GB/s, config and launch cost."""
    one = ws[0]
    x = torch.randn(batch, shape[1], device=device, dtype=torch.bfloat16 if CUDA else torch.float32)
    y = kt.dequant_matmul(x, one)
    ref = x.double() @ one.dequantize(torch.float64).T
    row = {"kernel": "gemv" if batch <= kt.GEMV_MAX_BATCH else "gemm",
           "max_rel_error": float((y.double() - ref).abs().max() / ref.abs().max())}
    if not CUDA:
        return row
    # batch 1 is autotuned; larger batches take the default config (one compile each, not one per
    # config: the step's time goes to measuring)
    config = None if batch == 1 else (kt.DEFAULT_GEMV if batch <= kt.GEMV_MAX_BATCH else kt.DEFAULT_GEMM)
    row["config"] = "autotuned" if config is None else str(config)
    calls = [lambda w=w: kt.dequant_matmul(x, w, config=config)
             for w in ws]
    sec = _graph_time(calls)
    gbps = one.nbytes / sec / 1e9
    row.update(seconds=sec, gbps=gbps, fraction_of_hbm_read=gbps / hbm["sum_read"]["gbps_median"],
               fraction_of_hbm_copy=gbps / hbm["copy_read_write"]["gbps_median"])
    if config is None and kt.tuned_config(bits, 64, batch):
        row["config"] = f"autotuned: {kt.tuned_config(bits, 64, batch)}"
    if batch == 1:  # host cost of one launch, queued without waiting
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            calls[0]()
        row["host_launch_us"] = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
    return row


def step_triton(args) -> dict:
    from offload_moe.kernels import kernels_triton as kt
    from offload_moe.kernels.groupwise import qlinear
    shapes = TINY if args.tiny else MIXTRAL
    out = {"shapes": {k: list(v) for k, v in shapes.items()}, "has_triton": kt.HAS_TRITON,
           "interpreter": kt.interpreting()}
    if not kt.HAS_TRITON:
        out["skipped"] = "triton is not installed"
        return out
    device = "cuda" if CUDA else "cpu"
    if not CUDA:
        out["skipped"] = "no CUDA device: GB/s needs a GPU; the kernels ran once each at toy size (interpreter)"
    else:
        out["hbm"] = _hbm(args.tiny)
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 60 << 20) or (60 << 20)
    batches = (1, 16) if args.tiny else (1, 4, 16)
    results = []
    for bits in (2, 3, 4, 8):
        for name, shape in shapes.items():
            one = _random_qweight(shape, bits, device)
            copies = 1 if not CUDA else max(2, -(-4 * l2 // one.nbytes))  # > 4x L2: every call reads cold
            ws = [one] + [_random_qweight(shape, bits, device) for _ in range(copies - 1)]
            for batch in batches:
                row = {"bits": bits, "matrix": name, "batch": batch, "bytes": one.nbytes}
                try:
                    row.update(_measure_kernel(kt, ws, shape, bits, batch, device, out.get("hbm")))
                except Exception as e:  # noqa: BLE001 - one failure must not hide the other rows
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                results.append(row)
                print(json.dumps(row), flush=True)
                write(Path(args.out), {**out, "results": results, "partial": True}, echo=False)  # survives a timeout
            del ws
    if CUDA:
        for name, shape in shapes.items():  # the references: dense bf16 and dequantize + matmul
            x = torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16)
            try:
                w16 = [torch.randn(shape, device="cuda", dtype=torch.bfloat16)
                       for _ in range(max(2, -(-4 * l2 // (2 * shape[0] * shape[1]))))]
                sec = _graph_time([lambda w=w: torch.nn.functional.linear(x, w) for w in w16])
                results.append({"bits": 16, "matrix": name, "batch": 1, "kernel": "dense bf16 F.linear",
                                "bytes": w16[0].nbytes, "seconds": sec, "gbps": w16[0].nbytes / sec / 1e9})
                del w16
            except Exception as e:  # noqa: BLE001
                results.append({"bits": 16, "matrix": name, "kernel": "dense bf16 F.linear", "error": str(e)[:500]})
            try:
                q = _random_qweight(shape, 4, "cuda")
                sec = _graph_time([lambda: qlinear(x, q, use_triton=False)], reps=3)
                results.append({"bits": 4, "matrix": name, "batch": 1, "kernel": "dequantize + matmul (torch)",
                                "bytes": q.nbytes, "seconds": sec, "gbps": q.nbytes / sec / 1e9})
            except Exception as e:  # noqa: BLE001
                results.append({"bits": 4, "matrix": name, "kernel": "dequantize + matmul (torch)",
                                "error": str(e)[:500]})
    out["results"] = results
    return out


# ---- host syncs per decode step ----

def step_syncs(args) -> dict:
    import offload_moe
    from offload_moe.checkpoints.synthetic import SyntheticCheckpoint
    layers = 2 if args.tiny else 4
    ckpt = SyntheticCheckpoint("mixtral-8x7b", layers=layers, scale=0.05 if args.tiny else 0.25, bits=4)
    device = "cuda" if CUDA else "cpu"
    model = offload_moe.load(ckpt, Placement(cache_slots=2, prefetch=1, cpu_experts="none"), device=device,
                             profile=None)
    prompt = list(range(3, 11))
    out = {"model": str(ckpt.path), "moe_layers": len(ckpt.config.moe_layers), "cache_slots": 2, "prefetch": 1}
    model.generate(prompt, max_new_tokens=4, temperature=0, ignore_eos=True)  # warm-up
    if not CUDA:
        out["skipped"] = "no CUDA device: set_sync_debug_mode counts CUDA syncs only (the decode ran on the CPU)"
        return out

    def count(new_tokens: int) -> Counter:
        where = Counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model.generate(prompt, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" in str(w.message):
                where[f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}"] += 1
        return where

    short, long = count(1), count(9)
    per_step = (sum(long.values()) - sum(short.values())) / 8
    out.update(syncs_prefill_and_first_token=sum(short.values()), syncs_per_decode_step=per_step,
               syncs_per_moe_layer_per_step=per_step / out["moe_layers"],
               by_line_9_tokens=dict(long.most_common(30)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("env", "h2d", "triton", "syncs"))
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the CPU check)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    data = {"env": step_env, "h2d": step_h2d, "triton": step_triton, "syncs": step_syncs}[args.step](args)
    data["step_seconds"] = time.perf_counter() - t0
    write(Path(args.out), data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
