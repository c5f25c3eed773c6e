"""How our C kernels are built and chosen (quant/kernel_build.py, quant/native.py): the typed
boundary mirrors its C header, the variant follows the CPU's features and OFFLOAD_MOE_ISA, a
library built from other sources is rebuilt (or, without a compiler, used and said so), a new .c
file is picked up by the build with no list to edit, and a fallback says once why it was taken."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from offload_moe.kernels import kernel_build, native

X86_V3 = set(kernel_build.VARIANTS["avx2"][2])
needs_cc = pytest.mark.skipif(kernel_build.compiler() is None, reason="needs a C compiler")


@needs_cc
def test_the_ctypes_structs_mirror_kernel_args_h(tmp_path):
    """Every field's offset and every struct's size, as the C compiler lays them out."""
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include "kernel_args.h"', 'int main(void) {']
    for name, struct in native.ARG_STRUCTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof({name}));')
        lines += [f'printf("{name}.{f} %zu\\n", offsetof({name}, {f}));' for f, _ in struct._fields_]
    (tmp_path / "layout.c").write_text("\n".join(lines + ["return 0; }"]))
    subprocess.run([kernel_build.compiler(), f"-I{kernel_build.HERE}", str(tmp_path / "layout.c"), "-o",
                    str(tmp_path / "layout")], check=True, timeout=120)
    c = dict(line.split() for line in subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True,
                                                     check=True).stdout.splitlines())
    py = {}
    for name, struct in native.ARG_STRUCTS.items():
        py[name] = str(ctypes.sizeof(struct))
        py.update({f"{name}.{f}": str(getattr(struct, f).offset) for f, _ in struct._fields_})
    assert py == c
    header = (kernel_build.HERE / "kernel_args.h").read_text()
    assert set(native.ARG_STRUCTS) == {w for w in native.ARG_STRUCTS if f"}} {w};" in header}


def test_every_struct_entry_point_takes_its_struct_and_refuses_another():
    lib = native.load()
    if lib is None:
        pytest.skip(native.status())
    x = native.torch.zeros(1, 64)
    with pytest.raises(ctypes.ArgumentError):
        lib.qmv_p(x.data_ptr(), 0, x.data_ptr(), 0, 1, native.GgmlArgs(), 1)     # a wrong struct is a TypeError
    for fn, (_, argtypes) in native.LIBRARIES["ggml"][1].items():
        if fn.endswith("_p"):
            assert argtypes[5]._type_.__name__ in native.ARG_STRUCTS


@pytest.mark.parametrize("features, arch, best", [
    (set(kernel_build.VARIANTS["avx512bf16"][2]), "x86_64", "avx512bf16"),
    (set(kernel_build.VARIANTS["avx512"][2]), "x86_64", "avx512"),
    (X86_V3 | {"avx512f"}, "x86_64", "avx2"),              # AVX-512 without BW/VL/VNNI: not enough
    (X86_V3 - {"f16c"}, "x86_64", "portable"),
    (set(), "x86_64", "portable"),
    ({"asimd", "asimddp"}, "aarch64", "neon-dotprod"),
    ({"asimd"}, "aarch64", "aarch64-portable"),
])
def test_the_best_variant_follows_the_cpu_features(features, arch, best):
    assert native.best_variant(features, arch) == (best, "")


def test_unknown_features_or_architecture_say_why():
    assert native.best_variant(None, "riscv64")[0] is None and "riscv64" in native.best_variant(None, "riscv64")[1]


def test_a_forced_variant_is_used_unless_the_cpu_cannot_run_it(monkeypatch):
    names = kernel_build.variants_for(kernel_build.machine())
    monkeypatch.setattr(native, "cpu_features", lambda: set(kernel_build.VARIANTS[names[-2]][2]))
    monkeypatch.setenv("OFFLOAD_MOE_ISA", names[-1])
    assert native._chosen() == (names[-1], "")
    monkeypatch.setenv("OFFLOAD_MOE_ISA", names[0])
    variant, why = native._chosen()
    assert variant == names[-2] and why.startswith(f"OFFLOAD_MOE_ISA={names[0]} needs CPU features this CPU lacks")
    monkeypatch.setenv("OFFLOAD_MOE_ISA", "sse9")
    assert "'sse9' is not one of" in native._chosen()[1]


def test_a_stale_build_is_rebuilt_or_without_a_compiler_used_and_said_once(monkeypatch, tmp_path):
    variant = native.best_variant()[0]
    if not native.packaged(variant).exists():
        pytest.skip("the package's libraries are not built here")
    built = []
    monkeypatch.setattr(kernel_build, "source_hash", lambda files=None: "edited-sources")
    monkeypatch.setattr(native, "build", lambda flags, variant: built.append((flags, variant)) or native.packaged(variant))
    native.open_variant(variant)
    assert built == [(kernel_build.VARIANTS[variant][1], variant)]               # rebuilt with the variant's flags
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            lib = native.open_variant(variant)
    assert lib.kernels_variant().decode() == variant and len(built) == 1
    assert [str(w.message) for w in caught] == [
        f"offload_moe: kernels_{variant}.so was built from other kernel sources than the package's "
        f"({lib.kernels_source_hash().decode()} != edited-sources) and there is no C compiler to rebuild it: "
        "using it as built"]


def test_a_fallback_says_why_once(tmp_path):
    probe = ("import warnings, torch; from offload_moe.kernels import native; "
             "print(native.load() is None, native.load('ggml') is None, native.status())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OFFLOAD_MOE_ISA": "native", "CC": "/nonexistent/cc",
                               "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=2) == ["True", "True", "unavailable: no C compiler ('/nonexistent/cc' not found)\n"]
    said = [line for line in done.stderr.splitlines() if "KernelWarning" in line]
    assert len(said) == 1 and "torch's kernels run instead" in said[0]


@needs_cc
def test_a_new_source_file_is_picked_up_by_the_build(tmp_path, monkeypatch):
    (tmp_path / "one.c").write_text("int one(void) { return 1; }\n")
    (tmp_path / "two.c").write_text('#include "kernel_args.h"\nint two(void) { return (int)sizeof(QmvArgs); }\n')
    (tmp_path / "kernel_args.h").write_text((kernel_build.HERE / "kernel_args.h").read_text())
    monkeypatch.setattr(kernel_build, "SOURCE_DIRS", (tmp_path,))
    assert [p.name for p in kernel_build.sources()] == ["one.c", "two.c"]
    out = kernel_build.compile_library(tmp_path / "out" / "kernels_portable.so", (), "portable")
    lib = ctypes.CDLL(str(out))
    assert lib.one() == 1 and lib.two() == ctypes.sizeof(native.QmvArgs)
    assert sorted(p.name for p in out.parent.iterdir()) == ["kernels_portable.so"]   # no objects left behind


def test_a_variant_that_does_not_load_falls_to_the_next_and_says_so(monkeypatch):
    names = kernel_build.variants_for(kernel_build.machine())
    names = names[names.index(native.best_variant()[0]):]                  # the ones this CPU runs
    if len(names) < 2:
        pytest.skip("this CPU runs only the portable variant")
    monkeypatch.setattr(native, "_chosen", lambda: (names[0], ""))
    monkeypatch.setattr(native, "_warned", set())
    real = native.open_variant

    def broken_first(variant):
        if variant == names[0]:
            raise OSError(f"kernels_{variant}.so: cannot open shared object file")
        return real(variant)

    monkeypatch.setattr(native, "open_variant", broken_first)
    native.library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib, what = native.library()
        assert what == names[1] and lib.kernels_variant().decode() == names[1]
        assert [str(w.message) for w in caught] == [
            f"offload_moe: using the {names[1]} kernels ({names[0]}: kernels_{names[0]}.so: cannot open shared "
            "object file)"]
    finally:
        native.library.cache_clear()


@needs_cc
def test_a_compiler_without_openmp_still_builds_the_kernels(tmp_path, monkeypatch):
    """Apple's clang rejects -fopenmp: the kernels are built without it (single-threaded) rather than not at all."""
    cc = tmp_path / "cc-no-openmp"
    cc.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "unsupported option -fopenmp" >&2; '
                  f'exit 1; }}; done\nexec {kernel_build.compiler()} "$@"\n')
    cc.chmod(0o755)
    assert not kernel_build.openmp(str(cc)) and kernel_build.openmp(kernel_build.compiler())
    out = kernel_build.compile_library(tmp_path / "kernels_portable.so", kernel_build.VARIANTS["portable"][1]
                                       if kernel_build.machine() == "x86_64" else (), "portable", cc=str(cc),
                                       files=[kernel_build.HERE / "kernels_info.c", native.SOURCE])
    lib = native.open_library(out, "qmv")
    assert lib.kernels_team(4) == 1 and lib.qmv_path() == 0     # no OpenMP: one thread, and it computes
