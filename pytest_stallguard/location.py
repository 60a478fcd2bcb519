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
# stdlib and site-packages directories: a library file is named relative to them
_LIBRARY_BASES = tuple(
    os.path.abspath(base) + os.sep
    for base in {sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib")}
    if base
)
_root = os.getcwd()
_cache: dict[str, bool] = {}
# Installed packages that are the app under test (a server run from its wheel): their
# frames are the user's code, named relative to the directory they are installed in.
_app_dirs: dict[str, str] = {}  # package dir -> the directory it is installed in
_FRAMEWORKS = frozenset({"fastapi", "starlette", "litestar", "quart", "anyio", "pydantic"})


def set_root(path: str) -> str:
    """Make paths in findings relative to ``path`` (pytest's rootdir); returns the old root."""
    global _root
    old, _root = _root, os.path.abspath(path)
    _cache.clear()
    return old


def root() -> str:
    return _root


def _is_library_path(path: str) -> bool:
    return (
        path.startswith(_PLUGIN_DIR)
        or "site-packages" in path
        or "dist-packages" in path
        or (path.startswith(_LIBRARY_DIRS) and not path.startswith(_root + os.sep))
    )


def is_user_file(filename: str) -> bool:
    known = _cache.get(filename)
    if known is not None:
        return known
    if filename.startswith("<"):
        result = False
    else:
        path = os.path.abspath(filename)
        result = not _is_library_path(path) or any(path.startswith(d) for d in _app_dirs)
    _cache[filename] = result
    return result


def add_app_module(module_name: str) -> None:
    """The app under test is (partly) defined in ``module_name``: when that module's
    top-level package is installed (site-packages), its frames count as the user's."""
    top = module_name.partition(".")[0]
    if not top or top in _FRAMEWORKS or top == __name__.partition(".")[0]:
        return
    module = sys.modules.get(top)
    file = getattr(module, "__file__", None)
    if not isinstance(file, str):
        return
    path = os.path.abspath(file)
    if not _is_library_path(path) or path.startswith(_PLUGIN_DIR):
        return
    is_package = os.path.basename(path) == "__init__.py"
    where = os.path.dirname(path) + os.sep if is_package else path
    if where not in _app_dirs:
        _app_dirs[where] = os.path.dirname(os.path.dirname(path) if is_package else path)
        _cache.clear()


def add_app(app: object) -> None:
    """Note the modules an ASGI app's own code lives in (its route endpoints, its class,
    the function itself), so an app installed as a package is located in its package."""
    seen: set[str] = set()
    stack: list[object] = [app]
    while stack and len(seen) < 50:
        obj = stack.pop()
        target = getattr(obj, "__wrapped__", None) or obj
        module = getattr(target, "__module__", None) or getattr(type(target), "__module__", "")
        if isinstance(module, str) and module not in seen:
            seen.add(module)
            add_app_module(module)
        routes = getattr(target, "routes", None)
        if isinstance(routes, list):
            for route in routes[:200]:
                endpoint = getattr(route, "endpoint", None)
                if endpoint is not None:
                    module = getattr(endpoint, "__module__", None)
                    if isinstance(module, str) and module not in seen:
                        seen.add(module)
                        add_app_module(module)
                sub = getattr(route, "app", None)
                if sub is not None and sub is not target:
                    stack.append(sub)


def is_plugin_file(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PLUGIN_DIR)


def library_path(filename: str) -> str:
    """A library file as its import path names it (``json/encoder.py``,
    ``starlette/routing.py``): relative to the stdlib or site-packages directory it is in;
    else as :func:`relative` names it."""
    path = os.path.abspath(filename)
    if is_user_file(filename):
        return relative(filename)
    best = ""
    for base in _LIBRARY_BASES:
        if path.startswith(base) and len(base) > len(best):
            best = base
    if not best:
        marker = os.sep + "site-packages" + os.sep
        if marker in path:
            return path.split(marker, 1)[1].replace(os.sep, "/")
        return relative(filename)
    return os.path.relpath(path, best).replace(os.sep, "/")


def relative(filename: str) -> str:
    path = os.path.abspath(filename)
    for package, installed_in in _app_dirs.items():
        if path.startswith(package):  # "shopapp/main.py", as the package names it
            return os.path.relpath(path, installed_in).replace(os.sep, "/")
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

