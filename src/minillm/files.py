"""Atomic file writes and the one JSON reader, shared by every module that touches user files.

The data goes to a temporary file in the same directory, is flushed to disk, and then
replaces the target with os.replace (atomic on POSIX and Windows): a crash at any moment leaves
either the old file or the whole new one, never half of one. The result has the permissions a
plain `open(path, "w")` would give: a new file 0o666 minus the umask, a replaced file its old mode
(`tempfile.mkstemp` would leave 0600, unreadable to anyone else sharing a run directory).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically, with the permissions a plain write gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # os.open with 0o666 lets the kernel apply the umask, exactly as open(path, "w") does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.exists():  # replacing a file keeps its mode
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, error: type[Exception] | None = None) -> dict[str, Any]:
    """Read a file holding one JSON object. A missing file raises `error` (default
    FileNotFoundError), content that is not a JSON object (truncated, corrupt, not UTF-8, a list ...)
    `error` (default ValueError); either way the one-line message names the file."""
    path = Path(path)
    if not path.is_file():
        raise (error or FileNotFoundError)(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise (error or ValueError)(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(data, dict):
        raise (error or ValueError)(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    return data
