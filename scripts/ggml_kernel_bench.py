"""Our ggml kernel against llama.cpp's CPU mul_mat, matrix by matrix (scripts/ggml_kernel_bench.c).

Builds the C harness against a llama.cpp build tree and our library for this machine, then runs it
for one Qwen3-30B-A3B expert matrix (768 x 2048), one Mixtral-8x7B expert matrix (14336 x 4096) and
the given types, token counts and threads. Each line: medians over interleaved rounds (llama.cpp,
ours, memcpy of the same bytes) of wall and process CPU time per matrix, and the relative difference
of the two results.

    python scripts/ggml_kernel_bench.py --llama /path/to/llama.cpp [--types q4_0,q8_0,q4_K,q6_K]
        [--tokens 1,128,512] [--threads 1,2] [--rounds 9]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from offload_moe.kernels import native

SHAPES = {"qwen3-30b-a3b": (768, 2048), "mixtral-8x7b": (14336, 4096)}
TOTAL_BYTES = 96e6   # distinct matrices cycled per round at decode: over the L3 cache in total


def build_harness(llama: Path, out: Path) -> Path:
    source = Path(__file__).with_name("ggml_kernel_bench.c")
    lib = llama / "build" / "bin"
    subprocess.run(["cc", "-O2", "-fopenmp", str(source), f"-I{llama / 'ggml' / 'include'}", f"-L{lib}", "-lggml",
                    "-lggml-base", "-lggml-cpu", "-ldl", "-lm", f"-Wl,-rpath,{lib}", "-o", str(out)], check=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama", type=Path, required=True, help="llama.cpp source tree with build/bin")
    ap.add_argument("--types", default="q4_0,q8_0,q4_K,q6_K")
    ap.add_argument("--tokens", default="1,128,512")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    harness = build_harness(args.llama, Path("/tmp") / "ggml_kernel_bench")
    lib, variant = native.library()   # the variant this package runs here (kernels_<variant>.so, or its rebuild)
    if lib is None:
        raise SystemExit(f"no kernel library: {variant}")
    ours = lib._name
    bytes_per_weight = {"q4_0": 18 / 32, "q8_0": 34 / 32, "q4_K": 144 / 256, "q6_K": 210 / 256, "q5_K": 176 / 256,
                        "q2_K": 84 / 256, "q3_K": 110 / 256, "q4_1": 20 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
                        "mxfp4": 17 / 32}
    for shape in args.shapes.split(","):
        rows, cols = SHAPES[shape]
        for n in (int(t) for t in args.tokens.split(",")):
            for threads in args.threads.split(","):
                for ggml_type in args.types.split(","):
                    nbytes = rows * cols * bytes_per_weight[ggml_type]
                    copies = max(1, int(TOTAL_BYTES // nbytes)) if n == 1 else 1
                    rounds = args.rounds if n * rows * cols < 2e9 else max(3, args.rounds // 3)
                    done = subprocess.run([str(harness), str(ours), ggml_type, str(rows), str(cols), str(n), threads,
                                           str(copies), str(rounds)], capture_output=True, text=True)
                    print(f"{shape}: {done.stdout.strip() or done.stderr.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
