"""Nothing of ours is left behind and nothing of the user's is touched: the disk tier's private
directory after a normal end, Ctrl-C, SIGTERM and SIGKILL (then the next run); a user's files in an
`offload_dir` (a planted symlink included); two processes on one `offload_dir`; quantize's partial
directory after SIGTERM / SIGHUP and after a run killed outright."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import offload_moe
from offload_moe.tools.convert import quantize

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO. What light through yonder window breaks?"
DISK_TIER = ["--offload", "disk", "--cache-slots", "2", "--device", "cpu", "--temperature", "0"]


def default_signals() -> None:
    """In the child, before exec: SIGHUP's and SIGINT's default dispositions. Under `nohup` (SIGHUP) or
    as a background job of a script (SIGINT) the ignored disposition is inherited across exec, and
    offload-moe rightly leaves an ignored signal ignored, so these tests would measure how the suite
    was started rather than our cleanup."""
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def cli(*args, tmpdir: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir), "NO_COLOR": "1"}
    return subprocess.Popen([sys.executable, "-m", "offload_moe", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals, **kwargs)


def ours(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("offload-moe-"))


def leftovers(directory: Path) -> list[str]:
    """What is in a scratch $TMPDIR after a run, less torch's own (empty) inductor cache directory."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("torchinductor_"))


def wait_until(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def layer_files_written(tmpdir: Path) -> bool:
    """Our directory exists and holds the last layer's file: the load is past writing the tier."""
    return any((tmpdir / name / "layer-003.experts").exists() for name in ours(tmpdir))


def test_disk_tier_removed_after_a_normal_end(tmp_path):
    proc = cli("generate", PROMPT, "--max-new-tokens", "8", *DISK_TIER, tmpdir=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.strip()
    assert leftovers(tmp_path) == []


# Runs the real CLI, but the first piece of text written to stdout waits there for a signal: the
# signal then lands mid-generation however loaded the machine is (the demo decodes 200 tokens in
# under a second, so signalling "soon after the tier is written" could find the run already over).
STALLED_GENERATE = """
import signal, sys
marker = sys.argv.pop(1)
class Stalls:
    def __init__(self, inner): self.inner, self.stalled = inner, False
    def __getattr__(self, name): return getattr(self.inner, name)
    def write(self, text):
        n = self.inner.write(text)
        if text.strip() and not self.stalled:
            self.stalled = True
            self.inner.flush()
            open(marker, "w").close()
            while True:
                signal.pause()  # a signal's handler runs here: KeyboardInterrupt, or cleanup and exit
        return n
sys.stdout = Stalls(sys.stdout)
from offload_moe.cli.main import main
sys.exit(main())
"""


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM),
                                         (signal.SIGHUP, -signal.SIGHUP)], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_disk_tier_removed_when_interrupted_mid_generation(tmp_path, sig, status):
    marker = tmp_path.parent / f"{tmp_path.name}.generating"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path), "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-c", STALLED_GENERATE, str(marker), "generate", PROMPT,
                             "--max-new-tokens", "200", *DISK_TIER], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    wait_until(marker.exists, proc)
    assert layer_files_written(tmp_path)  # the tier is there while it generates
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "Traceback" not in err, err
    assert leftovers(tmp_path) == []


def test_disk_tier_of_a_killed_run_is_removed_by_the_next(tmp_path):
    proc = cli("generate", PROMPT, "--max-new-tokens", "200", *DISK_TIER, tmpdir=tmp_path)
    wait_until(lambda: layer_files_written(tmp_path), proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = ours(tmp_path)
    assert len(left) == 1 and left[0].startswith(f"offload-moe-{proc.pid}-")  # SIGKILL cannot be caught
    again = cli("generate", PROMPT, "--max-new-tokens", "4", *DISK_TIER, tmpdir=tmp_path)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert leftovers(tmp_path) == []


def digest(directory: Path) -> dict[str, str]:
    """name -> sha256 of the bytes (symlinks: the link text, never followed)."""
    out = {}
    for p in sorted(directory.rglob("*")):
        key = str(p.relative_to(directory))
        if p.is_symlink():
            out[key] = "link:" + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


def test_user_files_in_offload_dir_are_untouched_and_symlinks_not_followed(tmp_path):
    user = tmp_path / "offload"
    user.mkdir()
    (user / "manifest.json").write_text('{"mine": true}\n')
    (user / ".write-test").write_text("keep me\n")
    (user / "layer-000.experts").write_bytes(b"my own layer file")
    target = tmp_path / "target.txt"
    target.write_text("the symlink's target\n")
    (user / "layer-000.partial").symlink_to(target)
    (user / "layer-001.partial").symlink_to(tmp_path / "does-not-exist-yet")
    before, target_before = digest(user), target.read_bytes()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = cli("generate", PROMPT, "--max-new-tokens", "8", *DISK_TIER, "--offload-dir", str(user), tmpdir=scratch)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert digest(user) == before
    assert target.read_bytes() == target_before
    assert not (tmp_path / "does-not-exist-yet").exists()
    assert leftovers(scratch) == []


def test_two_processes_share_an_offload_dir(tmp_path):
    shared = tmp_path / "shared"
    args = ("generate", PROMPT, *DISK_TIER, "--offload-dir", str(shared))
    first = cli(*args, "--max-new-tokens", "200", tmpdir=tmp_path)
    wait_until(lambda: shared.exists() and layer_files_written(shared), first)
    second = cli(*args, "--max-new-tokens", "24", tmpdir=tmp_path)  # writes while the first reads its own
    (out1, err1), (out2, err2) = first.communicate(timeout=300), second.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    demo = offload_moe.load(device="cpu")
    for out, n in ((out1, 200), (out2, 24)):
        assert out.strip() == demo.generate(PROMPT, max_new_tokens=n, temperature=0).text.strip()
    assert not shared.exists() or list(shared.iterdir()) == []  # the one that made it removes it if it can


# ---------------------------------------------------------------- quantize's partial directory


def partials(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_quantize_removes_its_partial_directory_on(tmp_path, sig):
    dst = tmp_path / "demo-int4"
    proc = cli("quantize", str(ROOT / "offload_moe" / "demo"), str(dst), "--experts", "int4", "--attention", "int4",
               "--group-size", "32", "--method", "hqq", "--device", "cpu", tmpdir=tmp_path)
    partial = tmp_path / f".demo-int4.partial-{proc.pid}"
    wait_until(lambda: partial.exists() and any(partial.iterdir()), proc)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    assert proc.returncode == -sig
    assert partials(tmp_path) == [] and not dst.exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_quantize_removes_stale_partials_of_dead_processes(tiny_checkpoint, tmp_path):
    stale = tmp_path / f".q.partial-{dead_pid()}"
    stale.mkdir()
    (stale / "model-00001-of-00004.safetensors").write_bytes(b"half")
    alive = tmp_path / f".q.partial-{os.getppid()}"  # a live process's: not ours to remove
    alive.mkdir()
    other = tmp_path / ".other.partial-1"
    other.mkdir()
    quantize(tiny_checkpoint[0], tmp_path / "q", experts="int4", attention="bf16", group_size=16, device="cpu")
    assert partials(tmp_path) == sorted([alive.name, other.name])
    assert (tmp_path / "q" / "config.json").exists()


def test_a_forked_child_does_not_remove_its_parents_paths(tmp_path):
    from offload_moe.base import owned_paths

    mine = tmp_path / "mine"
    mine.mkdir()
    owned_paths.own(mine)
    pid = os.fork()
    if pid == 0:  # the child exits through the same cleanup a normal exit runs
        owned_paths.release_all()
        os._exit(0 if mine.exists() else 1)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    owned_paths.release(mine)
    assert not mine.exists()
