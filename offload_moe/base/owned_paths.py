"""Paths this process created and must not leave behind.

`own(path)` registers a directory of ours; it is removed when `release(path)` is called, at normal
interpreter exit, on SIGTERM and SIGHUP (the handlers are installed once, only where nobody else
installed one, and re-deliver the signal after cleaning so the exit status stays what the sender
expects), and after Ctrl-C (KeyboardInterrupt unwinds to a normal exit). SIGKILL cannot be caught:
such leftovers carry the dead process's PID in their name, and `remove_stale` deletes them at the
next start. Bottom layer: imports nothing of offload_moe.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import stat
import threading
from pathlib import Path

# path -> (remove its parent too if empty, the pid that made it: a forked child inherits the
# registry, not the ownership)
_owned: dict[Path, tuple[bool, int]] = {}
_lock = threading.Lock()
_installed = False
CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


def own(path: Path, remove_parent_if_empty: bool = False) -> None:
    with _lock:
        _owned[Path(path)] = (remove_parent_if_empty, os.getpid())
    _install()


def release(path: Path) -> None:
    """Remove one owned path now (idempotent)."""
    with _lock:
        parent, _ = _owned.pop(Path(path), (False, None))
    _remove(Path(path), parent)


def release_all() -> None:
    """Remove every path this process made (not those a forked child inherited from its parent)."""
    me = os.getpid()
    with _lock:
        items = [(path, parent) for path, (parent, pid) in _owned.items() if pid == me]
        _owned.clear()
    for path, parent in items:
        _remove(path, parent)


def _remove(path: Path, remove_parent: bool | None) -> None:
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path, ignore_errors=True)  # rmtree never follows symlinks inside
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
    if remove_parent:
        try:
            os.rmdir(path.parent)  # only succeeds if empty: nothing of the user's is touched
        except OSError:
            pass


def remove_stale(base: Path, pattern: re.Pattern) -> list[Path]:
    """Remove entries of `base` named like ours (`pattern`'s group 'pid') whose process is gone and
    that belong to this user. Returns what was removed."""
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or pid_alive(int(m.group("pid"))):
            continue
        path = base / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != os.getuid() or stat.S_ISLNK(st.st_mode):
            continue
        _remove(path, False)
        removed.append(path)
    return removed


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    atexit.register(release_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in CLEANUP_SIGNALS:
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _on_signal)
        except (ValueError, OSError):
            pass


def _on_signal(signum, frame):
    release_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
