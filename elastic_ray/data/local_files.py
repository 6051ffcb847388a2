"""Opening a local file that an untrusted row or input names: regular files only, and only under
the allowed folders once every symlink is resolved.

The checks never open anything that could block or have side effects: the path is resolved
with `realpath` (readlink, no open), its type taken with `lstat`, and only a regular file is
opened, non-blocking and without following a link, then checked again on the open descriptor
(the same inode, still regular), so a file swapped for a FIFO or a link in between is refused.
"""

import os
import stat
from typing import BinaryIO, Iterable


class FileRefused(ValueError):
    """A local path outside the allowed folders once resolved, or not a regular file."""


_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symlink"))
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def kind(mode: int) -> str:
    """What a file is, from its `st_mode`."""
    return next((name for test, name in _KINDS if test(mode)),
                "regular file" if stat.S_ISREG(mode) else "special file")


def resolve_under(path: str, allowed: Iterable[str]) -> str:
    """`path` with every symlink resolved, if that lies under one of the `allowed` folders (each
    resolved too, so an input folder reached through a link still holds its own files)."""
    real, allowed = os.path.realpath(path), tuple(allowed)
    for folder in allowed:
        root = os.path.realpath(folder)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return real
    raise FileRefused(f"{path} resolves to {real}, outside the allowed locations {list(allowed)}")


def open_regular(path: str, allowed: Iterable[str]) -> BinaryIO:
    """`path` opened for reading, if it resolves under `allowed` to a regular file.

    Raises FileNotFoundError for a missing file and FileRefused for anything else refused."""
    real = resolve_under(path, allowed)
    before = os.lstat(real)
    if not stat.S_ISREG(before.st_mode):
        raise FileRefused(f"{path} is a {kind(before.st_mode)}, not a regular file")
    fd = os.open(real, _OPEN_FLAGS)
    try:
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(after.st_mode):
            raise FileRefused(f"{path} changed while it was being opened")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
