"""fused_lora.core.files.read_regular_file: the bounded, non-blocking read of a file that anyone may have put
in place (the backend cache reads through it; issue 18 item 9)."""
import os
import threading

import pytest

from fused_lora.core.files import read_regular_file


class Refused(ValueError):
    """The error type a caller asks for (a loader would pass its own, e.g. AdapterError)."""


def _within(seconds, fn):
    """fn() in a daemon thread, failing the test if it blocks (a FIFO's open waits for a writer)."""
    out = {}
    t = threading.Thread(target=lambda: out.update(result=_catch(fn)), daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"blocked for {seconds} s")
    return out["result"]


def _catch(fn):
    try:
        return fn()
    except Exception as err:
        return err


def test_a_regular_file_within_the_bound_is_read(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(str(path), 100) == b"x" * 100  # exactly the bound: read
    link = tmp_path / "link"
    link.symlink_to(path)
    assert read_regular_file(str(link), 100) == b"x" * 100  # a link to a regular file is followed


def test_a_file_over_the_bound_is_refused_by_name(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 101)
    with pytest.raises(Refused, match=r"f is too large \(over 100 bytes\) for a test file"):
        read_regular_file(str(path), 100, "a test file", Refused)
    path.write_bytes(b"x" * ((2 << 20) + 1))
    with pytest.raises(ValueError, match=r"over 2 MiB"):
        read_regular_file(str(path), 2 << 20)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
@pytest.mark.parametrize("kind, named", [("fifo", "a FIFO"), ("/dev/zero", "a character device"),
                                         ("/dev/urandom", "a character device"), ("dir", "a directory")])
def test_what_is_not_a_regular_file_is_refused_without_blocking(tmp_path, kind, named):
    path = tmp_path / "f"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif os.path.exists(kind):
        path.symlink_to(kind)
    else:
        pytest.skip(f"{kind} not on this system")
    err = _within(10, lambda: read_regular_file(str(path), 1 << 20, "a test file", Refused))
    assert isinstance(err, Refused) and f"is not a regular file ({named})" in str(err), err


def test_a_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_regular_file(str(tmp_path / "absent"), 10)
