"""Output paths: ComfyUI-style counters and writes that never clobber a file.

A generation run can take many minutes, so its result must never overwrite an
earlier one and a crash must never leave a half-written file under the final
name. Every writer therefore renders into a hidden temporary file (or folder)
beside the target and `publish`es it in one step at the end; a counter name
(`prefix_00001.mp4`, `prefix_00002.mp4`, ...) takes the next number above any
already used by that prefix, whatever the extension, so a video, its `.json`
sidecar and a later PNG of the same prefix never share a number.

A writer killed outright (SIGKILL, the OOM killer) skips its clean-up, so a
temporary name carries the writer's pid and host and the next write into that
folder removes the ones whose writer is gone.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from kinema.errors import KinemaError

COUNTER_DIGITS = 5
# Names of other machines' or containers' writers sharing a folder differ here, so their pids are never tested.
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
PARTIAL = re.compile(r"^\..+\.partial-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}$")


def next_counter(directory: Path, prefix: str) -> int:
    """One above the highest `prefix_NNNNN*` counter already in `directory` (1 if none)."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d{{{COUNTER_DIGITS},}})(?:\.|$)")
    used = [int(m.group(1)) for name in os.listdir(directory) if (m := pattern.match(name))]
    return max(used, default=0) + 1


def counter_name(prefix: str, counter: int, ext: str) -> str:
    """`prefix_00001.ext` (`ext` without its dot; empty for a folder)."""
    stem = f"{prefix}_{counter:0{COUNTER_DIGITS}d}"
    return f"{stem}.{ext}" if ext else stem


def check_prefix(prefix: str) -> None:
    if not prefix or os.sep in prefix or (os.altsep and os.altsep in prefix) or prefix in (".", ".."):
        raise KinemaError(
            f"filename_prefix {prefix!r} is not a plain file name; pass a name such as 'kinema' "
            "and put folders in the output path instead"
        )


def temp_path(final: Path) -> Path:
    """A hidden sibling of `final`, so the rename into place stays on one file system; the pid and
    host say whose it is, so `remove_stale` can tell a killed writer's leftovers from a live one's."""
    return final.with_name(f".{final.name}.partial-{os.getpid()}-{HOST}-{uuid.uuid4().hex[:8]}")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists here; anything uncertain counts as alive, so nothing live is removed."""
    if os.name != "posix" or pid <= 0:  # Windows' os.kill terminates the process it is asked about
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by another user
        return True
    return True


def remove_stale(folder: Path) -> None:
    """Remove the temporary files and folders of writers on this host that died without cleaning up.

    Best effort: a folder that cannot be listed, or a file another run removes first, is left alone.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = PARTIAL.match(name)
        if m and m["host"] == HOST and not pid_alive(int(m["pid"])):
            try:
                remove(folder / name)
            except OSError:
                pass


def check_writable(folder: Path) -> None:
    """Create and remove a file in `folder`: the only test that holds as root, on read-only
    mounts and on network shares, where `os.access` answers from permission bits alone."""
    probe = temp_path(folder / "write-check")
    with open(probe, "xb"):
        pass
    probe.unlink()


def first_file_above(path: Path) -> Path | None:
    """The nearest of `path` and its parents that is a file: what stops a folder being created there."""
    for p in (path, *path.parents):
        if p.exists():
            return p if not p.is_dir() else None
    return None


_FIXES = {
    errno.ENOSPC: "the disk is full; free some space or choose an output folder on another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose an output folder on another disk",
    errno.EROFS: "it is on a read-only file system; choose a writable output folder",
    errno.EACCES: "permission denied; choose a folder you can write to, or change its permissions",
    errno.EPERM: "permission denied; choose a folder you can write to, or change its permissions",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter path or filename_prefix",
}


def write_error(path: Path, e: OSError) -> KinemaError:
    """One line for an output place that refused a write: what the system said and what to do about it."""
    blocker = first_file_above(path) if e.errno in (errno.ENOTDIR, errno.EEXIST) else None
    if blocker is not None:
        return KinemaError(f"cannot write {path}: {blocker} is a file, not a folder; move it away or choose another output path")
    fix = _FIXES.get(e.errno, "choose another output folder")
    return KinemaError(f"cannot write {path} ({e.strerror or e}): {fix}")


def publish(tmp: Path, final: Path, overwrite: bool = False) -> None:
    """Move a finished `tmp` to `final` in one step, refusing to replace `final` unless asked.

    Files go through `os.link`, which fails atomically when `final` exists, so
    two runs racing for the same counter cannot overwrite each other. Folders
    (PNG sequences) cannot be linked and use a check-then-rename.
    """
    if tmp.is_dir():
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.rename(tmp, final)
        return
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if final.exists():
            raise FileExistsError(final) from None
        os.rename(tmp, final)
        return
    tmp.unlink()


def remove(path: Path) -> None:
    """Best-effort clean-up of a temporary file or folder after a failed write."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
