"""Finding the app under test: ``"pkg.module:app"`` or ``"pkg.module:create_app()"``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from .errors import AppLoadError

HOW = (
    'set stallguard_app = "pkg.module:app" (or "pkg.module:create_app()") in your pytest '
    "ini file, or override the stall_app fixture to return your ASGI app"
)


def is_asgi_app(obj: Any) -> bool:
    """An ASGI 3 app is an async callable taking (scope, receive, send)."""
    if inspect.isclass(obj) or not callable(obj):
        return False
    target = obj if inspect.isfunction(obj) or inspect.ismethod(obj) else obj.__call__
    while hasattr(target, "__wrapped__") and not inspect.iscoroutinefunction(target):
        target = target.__wrapped__
    if inspect.iscoroutinefunction(target):
        return True
    # Some apps (middleware objects, partials) hide their coroutine behind __call__ magic;
    # accept any callable with three positional parameters.
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return len(params) == 3


def check_app(obj: Any, where: str) -> Any:
    if not is_asgi_app(obj):
        raise AppLoadError(
            f"{where} gave {obj!r} ({type(obj).__name__}), which is not an ASGI app: an ASGI "
            "app is an async callable taking (scope, receive, send), such as a FastAPI() or "
            f"Starlette() instance. To fix it, {HOW}."
        )
    return obj


def load_app(spec: str, where: str = "stallguard_app") -> Any:
    """Import ``module:attr`` (dots allowed in attr) and call it if it ends with ``()``."""
    text = spec.strip()
    module_name, sep, attr = text.partition(":")
    if not sep or not module_name or not attr:
        raise AppLoadError(
            f"{where} = {spec!r} is not an import string: write it as 'pkg.module:app' or "
            "'pkg.module:create_app()'"
        )
    factory = attr.endswith("()")
    if factory:
        attr = attr[:-2]
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppLoadError(
            f"{where} = {spec!r}: could not import module {module_name!r} ({exc}). Check the "
            "module path and that its package is importable from the rootdir (pythonpath)."
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(
                f"{where} = {spec!r}: module {module_name!r} has no attribute {attr!r}. "
                f"Names it has: {', '.join(n for n in dir(obj) if not n.startswith('_'))[:300]}"
            ) from None
    if factory:
        if not callable(obj):
            raise AppLoadError(f"{where} = {spec!r}: {attr!r} is not callable, drop the '()'")
        obj = obj()
    return check_app(obj, f"{where} = {spec!r}")
