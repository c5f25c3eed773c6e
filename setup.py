"""Builds the C kernels with the package: one shared library per instruction-set variant of this
machine's architecture (offload_moe/kernels/kernel_build.py holds the sources, variants and flags),
so a wheel carries them and its user needs no compiler. Everything else is in pyproject.toml.

The libraries are plain shared objects loaded with ctypes (not Python extension modules), so
`build_ext` is taught to name them `kernels_<variant>.so` and to build them with kernel_build's
own compile step; an editable install puts them next to the sources (git-ignored).
No compiler: the build stops with one line saying so (OFFLOAD_MOE_NO_KERNELS=1 installs without
them; torch's kernels then run and the package says why at first use).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
KERNEL_BUILD = ROOT / "offload_moe" / "kernels" / "kernel_build.py"


def _kernel_build():
    """kernel_build.py loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_offload_moe_kernel_build", KERNEL_BUILD)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kb = _kernel_build()
PACKAGE = ".".join(KERNEL_BUILD.parent.relative_to(ROOT).parts)   # where the libraries go: next to kernel_build


class BuildKernels(build_ext):
    """Every variant's library, compiled in parallel with kernel_build.compile_library."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extensions(self) -> None:
        if kb.compiler() is None:
            raise SystemExit(f"offload-moe: building the C kernels needs a C compiler ({os.environ.get('CC') or 'cc'!r} "
                             "not found); install one, or set OFFLOAD_MOE_NO_KERNELS=1 to install without them")
        with ThreadPoolExecutor(max_workers=len(self.extensions) or 1) as pool:
            list(pool.map(self.build_extension, self.extensions))

    def build_extension(self, ext: Extension) -> None:
        variant = ext.name.rsplit(".", 1)[1][len("kernels_"):]
        out = Path(self.get_ext_fullpath(ext.name))
        print(f"building {out.name} ({' '.join(kb.VARIANTS[variant][1])})", flush=True)
        kb.compile_library(out, kb.VARIANTS[variant][1], variant, jobs=max(1, (os.cpu_count() or 1) // 2))


def _kernels() -> list[Extension]:
    if os.environ.get("OFFLOAD_MOE_NO_KERNELS") == "1":
        return []
    sources = [str(p.relative_to(ROOT)) for p in kb.sources()]   # listed so setuptools sees what they depend on
    return [Extension(f"{PACKAGE}.{Path(kb.library_name(v)).stem}", sources=sources,
                      depends=[str(p.relative_to(ROOT)) for p in kb.headers()])
            for v in kb.variants_for(kb.machine())]


setup(ext_modules=_kernels(), cmdclass={"build_ext": BuildKernels})
