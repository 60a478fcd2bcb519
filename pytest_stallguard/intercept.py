"""Attribute requests the test sends through its own client, with no fixture of ours.

``--stall-guard`` runs an existing suite unchanged. Its tests build their own
``httpx.ASGITransport``, ``asgi_lifespan.LifespanManager`` or Starlette ``TestClient``; we
wrap the app they are given with :func:`context.attributed`, which adds the request label
to the context and changes nothing the app sees.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from .context import attributed

# (module, class, name of the app parameter, its position after self)
TARGETS = (
    ("httpx", "ASGITransport", "app", 0),
    ("asgi_lifespan", "LifespanManager", "app", 0),
    ("starlette.testclient", "TestClient", "app", 0),
)

_originals: dict[tuple[str, str], Callable[..., None]] = {}


def _wrap_init(original: Callable[..., None], name: str, position: int) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if name in kwargs:
            kwargs[name] = attributed(kwargs[name])
        elif len(args) > position:
            args = (*args[:position], attributed(args[position]), *args[position + 1 :])
        original(self, *args, **kwargs)

    return __init__


def install() -> None:
    """Wrap the constructors (idempotent). Modules that are not installed are skipped."""
    for module_name, class_name, name, position in TARGETS:
        key = (module_name, class_name)
        if key in _originals:
            continue
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        _originals[key] = cls.__init__
        cls.__init__ = _wrap_init(cls.__init__, name, position)


def uninstall() -> None:
    """Put every original constructor back."""
    for (module_name, class_name), original in list(_originals.items()):
        cls = getattr(importlib.import_module(module_name), class_name)
        cls.__init__ = original
        del _originals[(module_name, class_name)]


def installed() -> bool:
    return bool(_originals)
