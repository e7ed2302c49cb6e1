"""Reading small files that anyone may have put in place (adapter configs, the backend cache), the
filesystem's name limits, and the message for a missing optional package.

A leaf module (no import from the package), so every reader can share it without import cycles.
"""
from __future__ import annotations

import os
import stat

# O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one (the check
# below then refuses it); it changes nothing for a regular file. O_NOCTTY: a terminal device at the
# path does not become the process's controlling terminal. Neither exists on Windows.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_BINARY", 0))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


def read_regular_file(path: str, max_bytes: int, what: str = "this file",
                      error: type[Exception] = ValueError) -> bytes:
    """The bytes of `path` (links followed) if it is a regular file of at most `max_bytes`.

    Anything else raises `error` with a message naming the path and the problem, without blocking and
    without reading more than max_bytes + 1 bytes: a FIFO (whose open or read would wait for a
    writer), a device such as /dev/zero or /dev/urandom (endless), a directory, or a file over the
    bound (`what` names the file's role in that message, e.g. "an adapter config"). The type is
    checked on the opened descriptor, so a path swapped between a check and the open cannot slip
    through. OSError from the open itself (missing file, no permission, a socket) propagates.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path} is not a regular file ({_kind(info.st_mode)}): not read")
        if info.st_size > max_bytes:
            raise error(f"{path} is too large (over {_size(max_bytes)}) for {what}")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed by f from here on
            data = f.read(max_bytes + 1)  # bounded even if the file grows after the fstat
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:
        raise error(f"{path} is too large (over {_size(max_bytes)}) for {what}")
    return data


def name_max(path: str) -> int:
    """The longest file name, in bytes, the filesystem holding `path` takes (255 where it cannot say)."""
    try:
        return os.pathconf(path, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255


def path_max(path: str) -> int:
    """The longest path, in bytes, the filesystem holding `path` takes (4096 where it cannot say)."""
    try:
        return os.pathconf(path, "PC_PATH_MAX")
    except (AttributeError, OSError, ValueError):
        return 4096


def missing_extra(feature: str, package: str, extra: str) -> str:
    """The one-line message for a feature whose optional package is not installed, naming the extra."""
    return f"{feature} needs {package}, which is not installed: pip install 'fused_lora[{extra}]'"
