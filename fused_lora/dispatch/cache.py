"""The on-disk cache of auto's tuned choices: where it lives, what keys a file (device, versions, a digest of
every implementation file), and reading and writing it safely.

A cache file that cannot be read, parsed or written is ignored (noted in the registry's `report()`, and a
warning once per file and process), never fatal: it is read only as a regular file of at most
MAX_CACHE_BYTES (a FIFO or a device at its path is refused without blocking: `core.files.read_regular_file`)
and only when every field has its type (`schema_error`); the next choice stored replaces it.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch

from ..core.files import read_regular_file
from ..core.version import __version__
from . import table

CACHE_ENV_VAR = "FUSED_LORA_CACHE_DIR"
CACHE_FORMAT = 1
MAX_CACHE_BYTES = 16 << 20  # a real cache holds kilobytes; this bounds what a hostile file costs


@dataclass
class Choice:
    """What auto chose for one key: the winner, each candidate's median ms, and failures."""
    winner: str
    ms: dict
    errors: dict = dataclasses.field(default_factory=dict)
    source: str = "timed"  # "timed" in this process, or "disk" (read from the cache)


def cache_dir() -> str:
    """Where tuned choices are kept: $FUSED_LORA_CACHE_DIR, else $XDG_CACHE_HOME/fused_lora, else
    ~/.cache/fused_lora."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fused_lora")


# The folders whose files key the tuned choices: every implementation (the Triton kernels, the PyTorch
# row, the core math and formats both read) and the rules choosing between them (this layer). By
# folder, not by a list kept by hand: a file added to any of them is covered.
DIGESTED_FOLDERS = ("core", "torch_row", "kernels", "dispatch")


PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digested_sources(root: str = PACKAGE_ROOT) -> list[str]:
    """The files whose content keys the tuned choices: every .py file under DIGESTED_FOLDERS of the
    package at `root`."""
    return sorted(path for folder in DIGESTED_FOLDERS
                  for path in glob.glob(os.path.join(root, folder, "**", "*.py"), recursive=True))


def sources_digest(root: str = PACKAGE_ROOT) -> str:
    """A digest of `digested_sources(root)`, names and contents: an edited, added or removed kernel,
    PyTorch path, format or selection rule invalidates the tuned choices."""
    h = hashlib.sha1()
    for path in digested_sources(root):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError:
            pass
    return h.hexdigest()[:12]


@lru_cache(maxsize=None)
def current_digest() -> str:
    """`sources_digest()` of the installed package, computed once per process."""
    return sources_digest()


def versions() -> dict:
    """What a tuned choice depends on besides the device."""
    try:
        triton_version = importlib.metadata.version("triton") if table.triton_installed() else None
    except Exception:  # metadata missing (a source checkout of triton): the digest still changes with ours
        triton_version = "unknown"
    return {"fused_lora": __version__, "sources": current_digest(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version}


def cache_file(directory: str, device: str, vers: dict) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")[:40] or "device"
    digest = hashlib.sha1(json.dumps([device, vers], sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(directory, f"backends-{slug}-{digest}.json")


def is_ms(v) -> bool:
    """A duration in milliseconds: a finite number >= 0 (JSON's integers are unbounded: one beyond any float
    is not a duration, and math.isfinite would raise OverflowError on it)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v) and v >= 0
    except OverflowError:
        return False


def schema_error(data) -> Optional[str]:
    """What makes a cache file's parsed data not a backend cache (a wrong type anywhere), or None.

    A file of the current format is what `Registry` stores: {"format": 1, "device": str,
    "versions": {str: str, number or null}, "choices": {key: {"winner": str, "ms": {str: finite ms >= 0},
    "errors": {str: str}}}}."""
    if not isinstance(data, dict):
        return f"not a fused_lora backend cache (a JSON {type(data).__name__}, not an object)"
    if data.get("format") != CACHE_FORMAT or isinstance(data.get("format"), bool):
        return f"not a fused_lora backend cache (format {data.get('format')!r}, expected {CACHE_FORMAT})"
    if not isinstance(data.get("device"), str):
        return f"its device is {type(data.get('device')).__name__}, not a string"
    vers = data.get("versions")
    if not isinstance(vers, dict) or not all(v is None or (isinstance(v, (str, int, float)) and not isinstance(v, bool))
                                             for v in vers.values()):
        return "its versions are not an object of strings, numbers or nulls"
    if not isinstance(data.get("choices"), dict):
        return f"its choices are {type(data.get('choices')).__name__}, not an object"
    for key, entry in data["choices"].items():
        if not isinstance(entry, dict):
            return f"choice {key!r} is {type(entry).__name__}, not an object"
        if not isinstance(entry.get("winner"), str):
            return f"choice {key!r}: its winner is {type(entry.get('winner')).__name__}, not a row's name"
        ms, errors = entry.get("ms"), entry.get("errors", {})
        if not isinstance(ms, dict) or not all(is_ms(v) for v in ms.values()):
            return f"choice {key!r}: its ms are not an object of finite milliseconds"
        if not isinstance(errors, dict) or not all(isinstance(v, str) for v in errors.values()):
            return f"choice {key!r}: its errors are not an object of strings"
    return None


def valid_choices(data, names: Sequence[str]) -> dict:
    """The choices of a cache file's data whose winner is a row of this table (others, from a table with
    other rows, are dropped); ValueError naming the problem when the data is not a well-formed backend
    cache (`schema_error`): such a file is ignored as a whole, never half trusted."""
    problem = schema_error(data)
    if problem:
        raise ValueError(problem)
    return {key: Choice(entry["winner"], dict(entry["ms"]), dict(entry.get("errors", {})), "disk")
            for key, entry in data["choices"].items() if entry["winner"] in names}


def read_json(path: str):
    """A cache file's parsed JSON, read as `files.read_regular_file` reads (a regular file of at most
    MAX_CACHE_BYTES: a FIFO or a link to /dev/zero at the path neither blocks nor reads without end);
    ValueError (or OSError) for a file that is not that, is not JSON, or is nested beyond the parser."""
    text = read_regular_file(path, MAX_CACHE_BYTES, "a backend cache")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("its JSON is nested too deeply for a backend cache") from None


def write_atomic(path: str, data: dict) -> None:
    """Write-then-rename in the same directory: a reader sees the old file or the new, never half."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".backends-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
