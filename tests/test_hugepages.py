"""The weights' mappings ask for huge pages (MADV_HUGEPAGE): the kernel marks the mapping `hg` in
/proc/self/smaps; `OFFLOAD_MOE_HUGEPAGES=0` leaves it unmarked. The speed it buys is measured in
BENCHMARKS.md ("Huge pages for the mapped weights"), not here."""

from __future__ import annotations

from pathlib import Path

import pytest

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
