"""The weights' mappings ask for huge pages (MADV_HUGEPAGE): the kernel marks the mapping `hg` in
/proc/self/smaps; `OFFLOAD_MOE_HUGEPAGES=0` leaves it unmarked. The speed it buys is measured in
BENCHMARKS.md ("Huge pages for the mapped weights"), not here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gguf_fixtures import T, tiny_mixtral_gguf
from offload_moe.checkpoints.gguf import GGUFFile
from offload_moe.checkpoints.safetensors_map import FileMaps

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                                reason="no transparent huge pages on this kernel")


def vm_flags(path: Path) -> list[set[str]]:
    """VmFlags of each mapping of `path` in this process."""
    flags, current = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0] and ":" not in line.split()[0]:
            current = line.rstrip().endswith(str(path))
        elif current and line.startswith("VmFlags:"):
            flags.append(set(line.split()[1:]))
    return flags


@pytest.fixture(scope="module")
def q4_file(tmp_path_factory):
    return tiny_mixtral_gguf(tmp_path_factory, "huge.gguf", T.Q4_0)


def test_a_gguf_mapping_asks_for_huge_pages(q4_file):
    f = GGUFFile(q4_file)
    flags = vm_flags(Path(q4_file).resolve())
    assert flags and all("hg" in f_ for f_ in flags)
    del f


def test_the_environment_switch_leaves_the_mapping_alone(tmp_path_factory, monkeypatch):
    path = tiny_mixtral_gguf(tmp_path_factory, "plain.gguf", T.Q4_0)   # a file no other test maps
    monkeypatch.setenv("OFFLOAD_MOE_HUGEPAGES", "0")
    f = GGUFFile(path)
    flags = vm_flags(Path(path).resolve())
    assert flags and not any("hg" in f_ for f_ in flags)
    del f


def test_a_safetensors_mapping_asks_for_huge_pages(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(1024, 1024)}, str(path))
    maps = FileMaps()
    maps.base(path)
    flags = vm_flags(path.resolve())
    assert flags and all("hg" in f_ for f_ in flags)


def test_an_expert_cache_buffer_asks_for_huge_pages():
    """`host_buffer`: 2 MB-aligned, in a private anonymous mapping marked for huge pages, the contents
    a plain tensor's; small ones are plain torch.empty."""
    from offload_moe.base.runtime import HUGE_PAGE, host_buffer

    t = host_buffer((3, HUGE_PAGE))
    assert t.shape == (3, HUGE_PAGE) and t.dtype == torch.uint8 and t.data_ptr() % HUGE_PAGE == 0
    t.fill_(7)
    assert int(t[2, -1]) == 7
    start = t.data_ptr()
    flags = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0] if line.split() else ""
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= start < hi
        elif line.startswith("VmFlags:") and inside:
            flags = set(line.split()[1:])
    assert flags is not None and "hg" in flags
    assert host_buffer((16,)).data_ptr() % 64 == 0      # small: torch's own allocation
