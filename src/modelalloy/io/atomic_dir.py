"""The output folder appears complete or not at all, whatever happens to the process.

``with AtomicOutputDir(out, force) as tmp:`` writes into a temporary sibling
``.<name>.tmp-<r>``, owned through a lock file ``.<name>.tmp-<r>.lock`` that holds the
owner's pid and an ``flock`` the kernel releases when the owner dies (so a killed process
is recognised even if its pid has been reused). On a clean exit the folder is moved onto
``out``:

- no output yet: ``renameat2(RENAME_NOREPLACE)`` (an output that appeared meanwhile is
  never replaced);
- ``--force`` over an existing output: ``renameat2(RENAME_EXCHANGE)`` swaps the two folders
  in one step, then the old one (now under the temporary name) is removed. Where the
  filesystem cannot swap, two renames: the old output moves to ``.<name>.old-<r>``, the new
  one into place. That ``.old-<r>`` folder is the journal: a run that finds it with a dead
  owner finishes the swap (the new output was complete before the first rename) or, if the
  new one is gone, puts the old output back.

Every run (``recover_leftovers``) first looks for temporaries of *its own* output whose owner
is dead, finishes or undoes a half-done swap, removes the rest, and says so in one line
(a :class:`LeftoverNotice` warning). A live owner's folders are never touched.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from modelalloy.errors import OutputError
from modelalloy.io.faults import fault_point

_LOCK = ".lock"
_NEW_LOCK = ".lock.new"


class LeftoverNotice(UserWarning):
    """A stale temporary output of a killed run was removed, or a half-done swap finished."""


# --------------------------------------------------------------------------- names shown


_display: dict[Path, Path] = {}  # temporary folder -> the output it becomes
_display_lock = threading.Lock()


def display_path(path: Path) -> Path:
    """``path`` with a live temporary output folder replaced by the output it becomes: error
    messages name the folder the user asked for, not a temporary one that is removed."""
    path = Path(path)
    with _display_lock:
        items = list(_display.items())
    for tmp, out in items:
        if path == tmp or tmp in path.parents:
            return out / path.relative_to(tmp)
    return path


# --------------------------------------------------------------------------- renames


def _libc_rename2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_rename2()
_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# What a filesystem (or an old kernel, or a seccomp filter) answers when it cannot do a flag.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the flag is not supported (nothing was
    done), OSError for a real failure (EEXIST for NOREPLACE onto an existing path)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Make the folder's small files durable too (the shards were fsynced by the writer, so
    their fsync costs nothing) before the output is moved into place."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the commit is done (main thread only; elsewhere the
    handlers cannot be changed and a signal is handled as usual)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda n, _f: pending.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for n in pending[:1]:
            handler = previous[signal.Signals(n)]
            if callable(handler):
                handler(n, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), n)


# --------------------------------------------------------------------------- leftovers


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _owner_pid(lock: Path) -> str:
    try:
        return lock.read_text().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return "?"


@contextmanager
def _dead_owner(lock: Path) -> Iterator[bool]:
    """True (holding the lock) when nobody holds ``lock``; False while its owner runs."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        yield True
        return
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def recover_leftovers(out_dir: Path) -> list[str]:
    """Finish or undo a half-done swap of ``out_dir`` and remove stale temporaries of it left
    by dead processes; return (and warn with) one line per thing done."""
    out = Path(out_dir).expanduser()
    parent = out.parent
    try:
        entries = [e for e in os.listdir(parent) if e.startswith(f".{out.name}.")]
    except OSError:
        return []
    tmp_re = re.compile(re.escape(f".{out.name}.tmp-") + r"([^.]+)(\.lock(?:\.new)?)?")
    old_re = re.compile(re.escape(f".{out.name}.old-") + r"([^.]+)")
    stems: set[str] = set()
    for e in entries:
        m = tmp_re.fullmatch(e) or old_re.fullmatch(e)
        if m:
            stems.add(m.group(1))
    done: list[str] = []
    for r in sorted(stems):
        tmp = parent / f".{out.name}.tmp-{r}"
        old = parent / f".{out.name}.old-{r}"
        lock = parent / f".{out.name}.tmp-{r}{_LOCK}"
        new_lock = parent / f".{out.name}.tmp-{r}{_NEW_LOCK}"
        with _dead_owner(lock if lock.exists() else new_lock) as dead:
            if not dead:
                continue
            pid = _owner_pid(lock) if lock.exists() else "?"
            who = f"left by process {pid}, which is no longer running" if pid != "?" else \
                "left by a run that was killed"
            done += _recover_one(out, tmp, old, who)
            for f in (lock, new_lock):
                try:
                    f.unlink()
                except FileNotFoundError:
                    pass
    if done:
        fsync_path(parent)
    for line in done:
        warnings.warn(line, LeftoverNotice, stacklevel=3)
    return done


def _recover_one(out: Path, tmp: Path, old: Path, who: str) -> list[str]:
    done = []
    old_dir = old / "x" if (old / "x").is_dir() else old  # earlier versions kept it in old/x
    if old.is_dir() and not out.exists():
        if tmp.is_dir() and old_dir is old:
            os.rename(tmp, out)  # the new output was complete: finish the swap
            done.append(f"{out}: finished replacing the output (a run {who} stopped halfway)")
        else:
            os.rename(old_dir, out)  # no new output to finish with: undo
            done.append(f"{out}: restored the previous output (a run {who} stopped halfway)")
    for path in (tmp, old):
        if path.is_dir() and not path.is_symlink():
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"{path.parent / path.name}: removed a stale temporary folder "
                        f"({human_size(size)}) {who}")
    return done


# --------------------------------------------------------------------------- the folder


class _WorkDir(type(Path())):  # type: ignore[misc]
    """The temporary folder: a Path whose ``.path`` is itself, so ``tmp`` and ``tmp.path``
    both work in ``with AtomicOutputDir(out) as tmp:``."""

    @property
    def path(self) -> Path:
        return Path(self)


def _refuse_existing(out: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out}: is a file or a link, not a folder; choose another output path")
    if out.exists() and not force:
        raise OutputError(
            f"{out}: already exists; pass force=True to replace it or choose another path",
            options=("force",))


class AtomicOutputDir:
    """``with AtomicOutputDir(out, force) as tmp:`` write into ``tmp`` (or ``tmp.path``).

    See the module docstring: the output appears complete or not at all; an existing one is
    replaced only with ``force``, in one atomic swap where the filesystem allows it. On any
    exception, Ctrl-C and SIGTERM included, the temporary folder is removed and ``out_dir``
    is left as it was. A disk-full or I/O error inside the block becomes an
    :class:`OutputError` that names ``out_dir``.
    """

    def __init__(self, out_dir: Path, force: bool = False) -> None:
        self.out_dir = Path(out_dir).expanduser()
        self.force = force
        self.path: Path | None = None  # the temporary folder, set by __enter__
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._active = False

    def __enter__(self) -> Path:
        if self._active:
            raise ValueError("AtomicOutputDir is already entered")
        out = self.out_dir
        recover_leftovers(out)
        _refuse_existing(out, self.force)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._create()
        except OSError as e:
            raise OutputError(
                f"{out}: cannot create the output folder ({e.strerror or e})"
            ) from None
        self.path = tmp
        self._active = True
        with _display_lock:
            _display[tmp] = out
        fault_point("output.created")
        return _WorkDir(tmp)

    def _create(self) -> Path:
        """The lock first (locked under a private name, then renamed: a lock that can be seen
        is always held), then the folder it guards."""
        out = self.out_dir
        for _ in range(10):
            fd, new = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=_NEW_LOCK,
                                       dir=out.parent)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(fd, f"{os.getpid()}\n".encode())
                lock = Path(new[: -len(_NEW_LOCK)] + _LOCK)
                os.rename(new, lock)
                tmp = Path(str(lock)[: -len(_LOCK)])
                os.mkdir(tmp)  # mode 0777 & ~umask, like any folder the user makes
            except (BlockingIOError, FileNotFoundError, FileExistsError):
                os.close(fd)  # another run's recovery took this name: try another
                continue
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd, self._lock_path = fd, lock
            return tmp
        raise OSError(errno.EEXIST, "could not create a temporary folder")

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._active or self.path is None:
            return
        self._active = False
        tmp = self.path
        try:
            if exc_type is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(exc, OSError):
                    raise self._os_error(exc) from None
                return
            try:
                with _signals_deferred():
                    self._commit(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            with _display_lock:
                _display.pop(tmp, None)
            self._unlock()

    def _os_error(self, exc: OSError) -> OutputError:
        out = self.out_dir
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = human_size(shutil.disk_usage(out.parent).free)
            except OSError:
                free = "?"
            return OutputError(f"{out}: the disk is full ({free} free now on the disk of "
                               f"{out.parent}); free some space or choose another output path")
        where = f" at {display_path(Path(exc.filename))}" if exc.filename else ""
        return OutputError(f"{out}: {exc.strerror or exc}{where} while writing it; nothing was "
                           "written, check the disk and try again")

    def _unlock(self) -> None:
        if self._lock_path is not None:
            try:
                self._lock_path.unlink()
            except OSError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._lock_fd = self._lock_path = None

    def _commit(self, tmp: Path) -> None:
        out = self.out_dir
        fault_point("commit.begin")
        _fsync_tree(tmp)
        try:
            if out.exists() or out.is_symlink():
                if not self.force:
                    raise OutputError(
                        f"{out}: appeared while merging; pass force=True to replace it "
                        "or choose another path", options=("force",))
                if out.is_symlink() or not out.is_dir():
                    raise OutputError(
                        f"{out}: is a file, not a folder; choose another output path"
                    )
                self._replace(tmp, out)
            else:
                self._place(tmp, out)
        except OSError as e:
            if isinstance(e, OutputError):
                raise
            raise OutputError(
                f"{out}: cannot move the finished output into place ({e.strerror or e})"
            ) from None
        fsync_path(out.parent)
        fault_point("commit.done")

    def _place(self, tmp: Path, out: Path) -> None:
        try:
            placed = rename2(tmp, out, RENAME_NOREPLACE)
        except FileExistsError:
            raise OutputError(f"{out}: appeared while merging; pass force=True to replace it "
                              "or choose another path", options=("force",)) from None
        if not placed:
            os.rename(tmp, out)

    def _replace(self, tmp: Path, out: Path) -> None:
        if rename2(tmp, out, RENAME_EXCHANGE):
            # `tmp` now holds the old output, still under our lock: a kill from here on
            # leaves the new output in place and a stale folder the next run removes.
            fault_point("commit.exchanged")
            fsync_path(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = out.parent / f".{out.name}.old-{tmp.name[len(f'.{out.name}.tmp-'):]}"
        os.rename(out, old)
        fault_point("commit.old-moved")
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        fsync_path(out.parent)
        shutil.rmtree(old, ignore_errors=True)
