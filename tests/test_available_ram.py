"""`runtime.available_ram`: MemAvailable, capped by the tightest memory cgroup (v1 or v2, the
process's own or an ancestor's, less reclaimable page cache) and by RLIMIT_AS. Fake /proc and
/sys/fs/cgroup trees stand in for the kernel's."""

from __future__ import annotations

import os
import resource

import pytest

from offload_moe.base.runtime import address_space_room, available_ram, cgroup_room

GB = 10**9


def meminfo(tmp_path, available: int):
    f = tmp_path / "meminfo"
    f.write_text(f"MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   {available // 1024} kB\n")
    return f


def write(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("_", ".", 1)).write_text(text)


def ram(tmp_path, cgroup_line: str, available: int = 16 * GB) -> int:
    (tmp_path / "cgroup").write_text(cgroup_line)
    return available_ram(meminfo=meminfo(tmp_path, available), self_cgroup=tmp_path / "cgroup",
                         cgroup_root=tmp_path / "fs", self_status=tmp_path / "no-status")


def test_no_cgroup_limit_is_memavailable(tmp_path):
    write(tmp_path / "fs" / "box", memory_max="max\n", memory_current=f"{GB}\n")
    assert ram(tmp_path, "0::/box\n", 16 * GB) == 16 * GB // 1024 * 1024


def test_cgroup_v2_limit_minus_usage(tmp_path):
    write(tmp_path / "fs" / "box", memory_max=f"{700 * 10**6}\n", memory_current=f"{100 * 10**6}\n")
    assert ram(tmp_path, "0::/box\n") == 600 * 10**6


def test_cgroup_v2_page_cache_is_not_usage(tmp_path):
    write(tmp_path / "fs" / "box", memory_max=f"{GB}\n", memory_current=f"{900 * 10**6}\n",
          memory_stat=f"anon 100000000\ninactive_file {500 * 10**6}\nactive_file 300000000\n")
    assert ram(tmp_path, "0::/box\n") == 600 * 10**6


def test_cgroup_v2_tightest_ancestor_wins(tmp_path):
    write(tmp_path / "fs" / "outer", memory_max=f"{GB}\n", memory_current=f"{800 * 10**6}\n")
    write(tmp_path / "fs" / "outer" / "inner", memory_max=f"{4 * GB}\n", memory_current=f"{10**6}\n")
    assert ram(tmp_path, "0::/outer/inner\n") == 200 * 10**6


def test_cgroup_v1_memory_controller(tmp_path):
    line = "12:pids:/x\n4:memory:/process_api/abc\n1:cpu,cpuacct:/y\n0::/\n"
    write(tmp_path / "fs" / "memory" / "process_api" / "abc", memory_limit_in_bytes=f"{2 * GB}\n",
          memory_usage_in_bytes=f"{GB}\n", memory_stat=f"cache 0\ntotal_inactive_file {250 * 10**6}\n")
    write(tmp_path / "fs" / "memory", memory_limit_in_bytes="9223372036854771712\n",  # v1's "no limit"
          memory_usage_in_bytes=f"{8 * GB}\n")
    assert ram(tmp_path, line) == 2 * GB - (GB - 250 * 10**6)


def test_cgroup_namespace_root_is_the_mount(tmp_path):
    """Inside a cgroup namespace /proc/self/cgroup says "/" and the limit sits at the mount's root."""
    write(tmp_path / "fs", memory_max=f"{GB}\n", memory_current=f"{GB // 4}\n")
    assert ram(tmp_path, "0::/\n") == GB - GB // 4


def test_full_cgroup_is_not_unknown(tmp_path):
    write(tmp_path / "fs" / "box", memory_max=f"{GB}\n", memory_current=f"{2 * GB}\n")
    assert ram(tmp_path, "0::/box\n") == 1  # 0 would read as "unknown" and skip every check


def test_unreadable_cgroup_files_are_no_limit(tmp_path):
    write(tmp_path / "fs" / "box", memory_max="garbage\n")
    assert cgroup_room(tmp_path / "missing", tmp_path / "fs") is None
    (tmp_path / "cgroup").write_text("0::/box\n")
    assert cgroup_room(tmp_path / "cgroup", tmp_path / "fs") is None


def test_address_space_limit(tmp_path, monkeypatch):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmSize:\t 1000000 kB\nVmRSS:\t 200000 kB\n")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (3 * 1024**3, resource.RLIM_INFINITY))
    assert address_space_room(status) == 3 * 1024**3 - 1000000 * 1024
    assert available_ram(meminfo=meminfo(tmp_path, 16 * GB), self_cgroup=tmp_path / "none",
                         self_status=status) == 3 * 1024**3 - 1000000 * 1024
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert address_space_room(status) is None


@pytest.mark.skipif(not os.path.exists("/proc/self/cgroup"), reason="no /proc/self/cgroup")
def test_this_machine_reads_without_error():
    assert available_ram() > 0
