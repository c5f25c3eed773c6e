"""How our C kernels are compiled: the one list of sources, the instruction-set variants, the flags.

Why a module of its own, with nothing but the standard library: three builders share it and must
agree. `setup.py` compiles every variant of this machine's architecture into the package when the
wheel (or an editable install) is built, so a user needs no compiler; `native.py` rebuilds a
variant at run time when the package's sources differ from what was built (an edited editable
install) or when `OFFLOAD_MOE_ISA=native` asks for a `-march=native` build; the aarch64 test
cross-compiles the same sources for qemu-user. setup.py loads this file by path (importing the
package would import torch), so it imports nothing of offload_moe.

One library per variant (`kernels_<variant>.so`) holds every source: each `.c` file in
`SOURCE_DIRS` is compiled (a new kernel file placed next to the others is picked up, no list to
edit) and linked together; `kernel_common.h` and the other headers there are on the include path.
OpenMP: sources are compiled with `-fopenmp` but the library is linked without an OpenMP runtime,
so its `GOMP_*` calls bind to the runtime already in the process (torch's; native.py loads it
globally first): one runtime, one thread pool, torch's thread count.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_DIRS = (HERE,)                                # kernels/*.c, decode.c among them
COMMON_FLAGS = ("-O3", "-fPIC", "-fopenmp", "-std=gnu11")
BUILD_TIMEOUT_S = 300

# variant -> (architecture, compiler flags, CPU feature flags it needs as /proc/cpuinfo names them),
# best first within an architecture; the portable one is the architecture's baseline.
_X86_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "abm"}             # x86-64-v3 (abm: lzcnt)
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
VARIANTS: dict[str, tuple[str, tuple[str, ...], frozenset[str]]] = {
    "avx512bf16": ("x86_64", ("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16"),
                   frozenset(_X86_V4 | {"avx512_vnni", "avx512_bf16"})),
    "avx512": ("x86_64", ("-march=x86-64-v4", "-mavx512vnni"), frozenset(_X86_V4 | {"avx512_vnni"})),
    "avx2": ("x86_64", ("-march=x86-64-v3",), frozenset(_X86_V3)),
    "portable": ("x86_64", ("-march=x86-64", "-mtune=generic"), frozenset()),
    "neon-dotprod": ("aarch64", ("-march=armv8.2-a+dotprod",), frozenset({"asimd", "asimddp"})),
    "aarch64-portable": ("aarch64", ("-march=armv8-a",), frozenset()),
}
NATIVE = ("-march=native",)   # the opt-in rebuild for this very CPU (OFFLOAD_MOE_ISA=native)


def machine() -> str:
    """This machine's architecture as VARIANTS names it (arm64 is aarch64)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def variants_for(arch: str) -> list[str]:
    """The variants built for `arch`, best first."""
    return [name for name, (a, _, _) in VARIANTS.items() if a == arch]


def library_name(variant: str) -> str:
    return f"kernels_{variant}.so"


def sources() -> list[Path]:
    """Every kernel source: the .c files of SOURCE_DIRS, sorted (the one list)."""
    return sorted(p for d in SOURCE_DIRS for p in d.glob("*.c"))


def headers() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in d.glob("*.h"))


def source_hash(files: list[Path] | None = None) -> str:
    """A hash of the kernel sources' names and bytes: what a built library records, and what a
    loader compares with the package's sources to find a stale build."""
    h = hashlib.sha256()
    for p in files if files is not None else sources() + headers():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def compiler(cc: str | None = None) -> str | None:
    return shutil.which(cc or os.environ.get("CC") or "cc")


@functools.cache
def openmp(cc: str) -> bool:
    """Whether `cc` compiles OpenMP (`-fopenmp`). Apple's clang does not: there the kernels are built
    without it and run on the calling thread (their pragmas ignored)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.c"
        probe.write_text("#include <omp.h>\nint f(void) { return omp_get_max_threads(); }\n")
        try:
            return subprocess.run([cc, "-fopenmp", "-c", str(probe), "-o", str(Path(tmp) / "probe.o")],
                                  capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def compile_library(out: Path, flags: tuple[str, ...], variant: str, cc: str | None = None,
                    files: list[Path] | None = None, jobs: int | None = None, link: bool = True) -> Path:
    """Compile `files` (default: every source) with `flags` and link them into `out`, written
    atomically (a temporary file renamed into place). `link=False` leaves the object files in
    `out` (a folder) instead, for a caller that links them into a program. Raises RuntimeError
    naming the file and the compiler's first error."""
    path = compiler(cc)
    if path is None:
        raise RuntimeError(f"no C compiler ({cc or os.environ.get('CC') or 'cc'!r} not found)")
    files = sources() if files is None else files
    common = COMMON_FLAGS if openmp(path) else tuple(f for f in COMMON_FLAGS if f != "-fopenmp")
    digest = source_hash(files + headers())
    defines = (f'-DKERNELS_VARIANT="{variant}"', f'-DKERNELS_SOURCE_HASH="{digest}"')
    includes = tuple(f"-I{d}" for d in SOURCE_DIRS)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out.parent)
    with tempfile.TemporaryDirectory(prefix=".kernels-", dir=out.parent) as tmp:
        objects = [Path(tmp) / f"{i}-{src.stem}.o" for i, src in enumerate(files)]

        def one(pair: tuple[Path, Path]) -> None:
            src, obj = pair
            _run([path, *common, *flags, *defines, *includes, "-c", str(src), "-o", str(obj)], src.name, path)

        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            list(pool.map(one, zip(files, objects)))
        if not link:
            out.mkdir(parents=True, exist_ok=True)
            for obj in objects:
                os.replace(obj, out / obj.name)
            return out
        partial = Path(tmp) / out.name
        # -shared without -fopenmp: no OpenMP runtime linked in, the process's one is used
        _run([path, "-shared", *flags, *map(str, objects), "-o", str(partial), "-lm"], out.name, path)
        os.chmod(partial, 0o755)
        os.replace(partial, out)   # atomic: another process sees no library or a whole one
    return out


def _remove_stale_partials(directory: Path, age_s: float = 900.0) -> None:
    """Folders of builds killed outright (older than any build takes)."""
    for partial in directory.glob(".kernels-*"):
        try:
            if time.time() - partial.stat().st_mtime > age_s:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass


def _run(command: list[str], what: str, cc: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{cc} took over {BUILD_TIMEOUT_S} s to build {what}") from None
    except OSError as e:
        raise RuntimeError(f"{cc} could not run: {e}") from None
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
        raise RuntimeError(f"{cc} could not build {what}: {first}")


def build_all(directory: Path, arch: str | None = None, cc: str | None = None) -> list[Path]:
    """Every variant of `arch` (default: this machine's) into `directory`: what setup.py ships."""
    return [compile_library(Path(directory) / library_name(v), VARIANTS[v][1], v, cc)
            for v in variants_for(arch or machine())]


__all__ = ["NATIVE", "SOURCE_DIRS", "VARIANTS", "build_all", "compile_library", "compiler", "headers",
           "library_name", "machine", "source_hash", "sources", "variants_for"]
