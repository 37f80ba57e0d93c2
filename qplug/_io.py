"""Crash-safe file and directory writes: write beside the target, make it durable, then swap it in.

A directory is replaced so that there is no instant at which its path lacks a complete version:

* the new directory is assembled beside the target (``.NAME.<token>.partial``), and every file and
  directory in it is fsynced;
* where the platform can exchange two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``), the
  two directories swap places in one step and the old one is deleted;
* elsewhere the staging directory becomes ``.NAME.<token>.ready`` (complete), the target moves
  aside to ``.NAME.<token>.old`` and the ready one takes its place. A crash between those two
  renames leaves no target, but :func:`recover_directory` (which loading and saving call) finishes
  the swap: the ``.ready`` directory, else the ``.old`` one, is renamed back to the target.

A writer holds an exclusive ``flock`` on its staging directory while it writes. A writer killed
outright (``SIGKILL``) cannot remove its ``.partial`` directory; the next write to the same target
does (:func:`remove_abandoned_staging`), once no process holds it.

Each rename is followed by an fsync of the parent directory. New files and directories get the
modes the umask gives (or, when replacing, the mode of what they replace), never ``0600``/``0700``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, abandoned staging directories stay
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_directory", "atomic_write_text", "directory_lock", "durable_replace", "recover_directory",
           "remove_abandoned_staging"]


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``; a failure or a crash leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None  # a new file: 0666 less the umask, as open() gives
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def durable_replace(source: Path, target: Path) -> None:
    """Rename the file ``source`` over ``target`` once its bytes are on disk; a crash leaves one or the other."""
    fd = os.open(source, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(source, target)
    _fsync_directory(Path(target).parent)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh directory beside ``target``; on success it replaces ``target`` (see the module docstring).

    On any failure the staging directory is removed and an existing ``target`` stays as it was.
    The new directory has the mode of the one it replaces, or the umask's default for a new one.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    if os.path.lexists(target) and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    remove_abandoned_staging(target)
    staging = _new_sibling(target, "partial")
    with contextlib.ExitStack() as held:
        held.enter_context(directory_lock(staging))
        try:
            if target.is_dir():
                os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
            yield staging
            _fsync_tree(staging)
            _swap_in(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


#: A staging directory untouched for this long, and locked by no process, was abandoned. The age
#: covers the instant between a writer's ``mkdir`` and its lock.
ABANDONED_AFTER_SECONDS = 60.0


def remove_abandoned_staging(target: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.NAME.<token>.partial`` directories beside ``target`` that a killed writer left.

    A writer holds an exclusive ``flock`` on its staging directory until it is done; the kernel drops
    it when the process dies, however it dies (``SIGKILL``, power loss). So a staging directory
    nobody holds, and unchanged for :data:`ABANDONED_AFTER_SECONDS`, can go: a concurrent write
    into the same target keeps its own. Where ``flock`` does not exist (Windows), nothing is removed.

    :return: the directories removed.
    """
    target = Path(target).absolute()
    if fcntl is None:
        return []
    pattern = re.compile(re.escape(f".{target.name}.") + r"[0-9a-f]{8}\.partial")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    removed = []
    now = time.time()
    for name in names:
        path = target.parent / name
        if not pattern.fullmatch(name):
            continue
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or now - info.st_mtime < ABANDONED_AFTER_SECONDS:
            continue
        try:
            with directory_lock(path, wait=False):
                shutil.rmtree(path)
        except (BlockingIOError, OSError):
            continue  # a live writer holds it, or it vanished meanwhile
        removed.append(path)
    return removed


@contextlib.contextmanager
def directory_lock(directory: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (no-op without ``fcntl``): a writer's claim on it.

    The kernel drops the lock when the process dies, however it dies, so a directory nobody holds
    was left by a writer that is gone.

    :raises BlockingIOError: ``wait`` is false and another process holds it.
    """
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)


def recover_directory(target: str | os.PathLike[str]) -> Path:
    """Finish a directory replacement that a crash interrupted between its two renames.

    When ``target`` is missing and a complete ``.NAME.<token>.ready`` (the new version) or
    ``.NAME.<token>.old`` (the previous one) is beside it, that directory is renamed to ``target``.
    Where the rename is not allowed (a read-only place), the leftover's own path is returned so it
    can still be read.

    :return: the path to read the directory from: ``target`` itself in every ordinary case.
    """
    target = Path(target)
    if os.path.lexists(target):
        return target
    leftovers = _leftovers(target)
    candidates = [p for kind in ("ready", "old") for p in leftovers.get(kind, [])]
    for candidate in candidates:
        try:
            os.rename(candidate, target)
        except OSError:
            if os.path.lexists(target):  # someone else finished it first
                break
            continue
        _fsync_directory(target.parent)
        if candidate in leftovers.get("ready", []):
            for old in leftovers.get("old", []):
                shutil.rmtree(old, ignore_errors=True)
        return target
    if not os.path.lexists(target) and candidates:
        return candidates[0]
    return target


# --------------------------------------------------------------------------------------------
# The swap
# --------------------------------------------------------------------------------------------


def _swap_in(staging: Path, target: Path) -> None:
    parent = target.parent
    if not os.path.lexists(target):
        os.replace(staging, target)
        _fsync_directory(parent)
        return
    if _exchange(staging, target):
        _fsync_directory(parent)
        shutil.rmtree(staging, ignore_errors=True)  # now the old version
        return
    ready = _sibling_name(staging, "ready")
    os.replace(staging, ready)
    _fsync_directory(parent)
    aside = _sibling_name(staging, "old")
    os.replace(target, aside)
    _fsync_directory(parent)
    try:
        os.replace(ready, target)
    except BaseException:
        os.replace(aside, target)
        shutil.rmtree(ready, ignore_errors=True)
        raise
    _fsync_directory(parent)
    if aside.is_symlink():  # the target was a link to a directory: the link is gone, its directory stays
        os.unlink(aside)
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; ``False`` where the platform or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None or os.path.islink(b):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _renameat2():
    if getattr(os, "uname", None) is None or os.uname().sysname != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


# --------------------------------------------------------------------------------------------
# Names and durability
# --------------------------------------------------------------------------------------------


def _new_sibling(target: Path, kind: str) -> Path:
    """A new directory ``.NAME.<token>.<kind>`` beside ``target`` (mode: 0777 less the umask)."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{secrets.token_hex(4)}.{kind}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name for a staging directory beside {target}")


def _sibling_name(staging: Path, kind: str) -> Path:
    return staging.with_name(staging.name.rsplit(".", 1)[0] + "." + kind)


def _leftovers(target: Path) -> dict[str, list[Path]]:
    """``.NAME.<token>.ready`` / ``.old`` directories beside ``target``, newest first."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"[0-9a-f]{8}\.(ready|old)")
    found: dict[str, list[tuple[float, Path]]] = {}
    try:
        names = os.listdir(target.parent)
    except OSError:
        return {}
    for name in names:
        match = pattern.fullmatch(name)
        path = target.parent / name
        if match and path.is_dir() and not path.is_symlink():
            found.setdefault(match.group(1), []).append((path.stat().st_mtime, path))
    return {kind: [p for _, p in sorted(items, reverse=True)] for kind, items in found.items()}


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (symbolic links are not followed)."""
    for directory, _, files in os.walk(root, followlinks=False):
        for name in files:
            path = os.path.join(directory, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_directory(Path(directory))


def _fsync_directory(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
