"""Find the user's line in a stack: the first frame outside stdlib, site-packages and us."""

from __future__ import annotations

import os
import sys
import sysconfig
from types import FrameType

_PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_dirs() -> tuple[str, ...]:
    dirs = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.abspath(path) + os.sep)
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        dirs.add(os.path.join(os.path.abspath(prefix), "lib") + os.sep)
    return tuple(sorted(dirs))


_LIBRARY_DIRS = _library_dirs()
_root = os.getcwd()
_cache: dict[str, bool] = {}


def set_root(path: str) -> str:
    """Make paths in findings relative to ``path`` (pytest's rootdir); returns the old root."""
    global _root
    old, _root = _root, os.path.abspath(path)
    _cache.clear()
    return old


def root() -> str:
    return _root


def is_user_file(filename: str) -> bool:
    known = _cache.get(filename)
    if known is not None:
        return known
    if filename.startswith("<"):
        result = False
    else:
        path = os.path.abspath(filename)
        result = not (
            path.startswith(_PLUGIN_DIR)
            or "site-packages" in path
            or "dist-packages" in path
            or (path.startswith(_LIBRARY_DIRS) and not path.startswith(_root + os.sep))
        )
    _cache[filename] = result
    return result


def relative(filename: str) -> str:
    path = os.path.abspath(filename)
    try:
        rel = os.path.relpath(path, _root)
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith("..") else rel.replace(os.sep, "/")


Location = tuple[str | None, int | None, str | None]


def user_location(frame: FrameType | None) -> Location:
    """(file relative to rootdir, line, function) of the first user frame, walking out."""
    first: FrameType | None = None
    while frame is not None:
        code = frame.f_code
        if is_user_file(code.co_filename):
            return relative(code.co_filename), frame.f_lineno, code.co_name
        if first is None and not code.co_filename.startswith(_PLUGIN_DIR):
            first = frame
        frame = frame.f_back
    if first is not None:  # no user frame at all: name the library frame nearest the call
        return relative(first.f_code.co_filename), first.f_lineno, first.f_code.co_name
    return None, None, None

