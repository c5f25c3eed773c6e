"""The CPU thread count: a default that leaves busy cores alone, and --threads on every command that
computes (generate, chat, serve, tune, bench)."""

import pytest
import torch

from offload_moe import OffloadMoeError
from offload_moe.cli.main import build_parser, main
from offload_moe.base.threads import default_threads, set_threads


@pytest.mark.parametrize("cores,load,expected", [(2, 0.2, 2), (2, 0.7, 1), (2, 9.5, 1), (16, 3.4, 13), (8, 0, 8)])
def test_default_leaves_busy_cores_alone(cores, load, expected):
    assert default_threads(cores, load) == expected


def test_set_threads_takes_a_count_or_auto():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads("2") == 2 and torch.get_num_threads() == 2
        assert set_threads("auto") == default_threads()
        for bad in (0, -1, "many", True, 1.5):
            with pytest.raises(OffloadMoeError, match="threads"):
                set_threads(bad)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["generate x", "chat", "serve", "tune", "bench"])
def test_every_computing_command_takes_threads(command):
    args = build_parser().parse_args([*command.split(), "--threads", "3"])
    assert args.threads == "3"
    assert build_parser().parse_args(command.split()).threads == "auto"


def test_bad_thread_count_is_one_line_and_exit_1(capsys):
    assert main(["generate", "hello", "--threads", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "threads" in err


@pytest.mark.skipif(not __import__("os").path.exists("/proc/stat"), reason="needs /proc/stat")
def test_busy_cores_sees_other_work_now():
    """A process spinning on one core is seen at once (the load average would take a minute)."""
    import subprocess
    import sys
    import time

    from offload_moe.base.threads import busy_cores

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(0.2) >= 0.5
    finally:
        spin.kill()
        spin.wait()
