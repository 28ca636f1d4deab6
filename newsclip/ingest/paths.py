"""File names from untrusted CSVs: resolved only inside their image folder, read only as capped regular files."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath


class UnsafePath(ValueError):
    """A file name from a CSV that would leave its image folder."""


def safe_path(folder: Path, name: str) -> Path:
    """`folder/name` for a name read from an untrusted CSV, resolved; UnsafePath if it could leave `folder`.

    Refuses absolute paths (POSIX or Windows), `..` components, NUL bytes, and names that resolve through a
    symlink to somewhere outside the folder. Subfolders inside the folder are fine.
    """
    if not name or "\x00" in name:
        raise UnsafePath("empty file name or NUL byte")
    posix = name.replace("\\", "/")  # a Windows-made CSV: "..\\x" must not slip past the ".." check
    if PurePosixPath(posix).is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        raise UnsafePath(f"absolute path {name!r}")
    if ".." in PurePosixPath(posix).parts:
        raise UnsafePath(f"path {name!r} contains '..'")
    root = folder.resolve()
    resolved = (root / posix).resolve()
    if not resolved.is_relative_to(root):
        raise UnsafePath(f"{name!r} resolves outside the image folder (symlink)")
    return resolved


def read_capped(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; OSError/ValueError otherwise."""
    # O_NOFOLLOW: the path is already resolved, so a symlink here was swapped in after the check
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"too large: {info.st_size} bytes > max_image_bytes {max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"too large: more than max_image_bytes {max_bytes}")
    return data
