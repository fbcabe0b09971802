"""One run per output folder: an OS lock held from before anything in the folder is touched to the run's end.

Two `train.py` started on the same --output-dir (a double launch, two terminals) would otherwise write
over each other: the first to end removes the other's decoded-image cache, and the folder is left with
one run's model and the other's records. So a run holds an exclusive `flock` on `.vitfood.lock` in the
folder, and a second run stops at once, naming the process that holds it (the lock file's content).

- The kernel releases the lock when its holder exits, however it exits (a crash, SIGKILL, os._exit):
  a lock file left behind is never stale, it is simply free.
- On release the file is removed while still locked. A run that opened the file just before and locks
  it just after holds a lock on a file no longer in the folder: it sees that (the path's inode is not
  its file's) and starts again on the new file.
- Under torchrun rank 0 holds the lock for the whole job; the other ranks write only where rank 0 does,
  and stop with it. flock on network filesystems (NFS, some FUSE mounts) is only as good as their lock
  support: there two machines may not see each other's lock.
- Windows has no fcntl: there the lock is not taken (an honest gap, said here, not a silent one).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vitfood.errors import VitfoodError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".vitfood.lock"


def holds_lock_for_job() -> bool:
    """A single process, or rank 0 of a torchrun job (read as distributed.init_distributed reads it, from
    WORLD_SIZE and RANK: the lock comes before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def output_dir_lock(out_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold --output-dir for the run inside the `with`; a second holder gets a one-line VitfoodError.

    Folders made only to hold the lock are removed again at the end if the run left them empty, so a run
    that fails before writing anything leaves nothing behind.
    """
    if not enabled or fcntl is None:
        yield
        return
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise VitfoodError(f"--output-dir {out_dir}: exists and is not a folder")
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VitfoodError(f"--output-dir {out_dir}: cannot write there ({e.strerror or e})") from None
    fd = None
    try:
        fd = _acquire(out_dir / LOCK_FILE, out_dir)
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(out_dir / LOCK_FILE)  # still locked: see the module's note
            os.close(fd)  # releases the lock
        for path in made:  # deepest first; only if nothing else was put there
            with contextlib.suppress(OSError):
                path.rmdir()


# flock's errors where the filesystem has no locks at all (as opposed to a lock held by another run)
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _acquire(path: Path, out_dir: Path) -> int | None:
    """The locked file's descriptor; None on a filesystem that takes no locks (with a warning)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise VitfoodError(f"--output-dir {out_dir}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise VitfoodError(f"--output-dir {out_dir} is in use by another run ({holder}); wait for it to end, "
                               "or choose another --output-dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_LOCKS:  # NFS mounted nolock, Lustre/GPFS without flock: run, but not in silence
                with contextlib.suppress(OSError):
                    os.unlink(path)
                print(f"vitfood: warning: --output-dir {out_dir}: this filesystem takes no locks "
                      f"({e.strerror or e}), so nothing stops a second run from using the folder at the same time",
                      file=sys.stderr)
                return None
            raise VitfoodError(f"--output-dir {out_dir}: cannot lock {path.name} there ({e.strerror or e}); "
                               "choose a folder on a local disk") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file we locked was removed by its last holder: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n".encode())
    return fd


def _read_holder(fd: int) -> str:
    """The holder's own description (pid, host, start), or what little can be said without it."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "its process has not written its pid yet"
