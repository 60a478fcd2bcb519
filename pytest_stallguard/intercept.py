"""Attribute requests the test sends through its own client, with no fixture of ours.

``--stall-guard`` runs an existing suite unchanged. Its tests build their own
``httpx.ASGITransport``, ``asgi_lifespan.LifespanManager`` or Starlette ``TestClient``; we
wrap the app they are given with :func:`context.attributed`, which adds the request label
to the context and changes nothing the app sees.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from .context import attributed

# (module, class, name of the app parameter, its position after self, runs app inline)
TARGETS = (
    ("httpx", "ASGITransport", "app", 0, True),
    ("asgi_lifespan", "LifespanManager", "app", 0, False),
    ("starlette.testclient", "TestClient", "app", 0, True),
)

_originals: dict[tuple[str, str], Callable[..., None]] = {}


def _wrap_init(
    original: Callable[..., None], name: str, position: int, isolate: bool
) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if name in kwargs:
            kwargs[name] = attributed(kwargs[name], isolate=isolate)
        elif len(args) > position:
            wrapped = attributed(args[position], isolate=isolate)
            args = (*args[:position], wrapped, *args[position + 1 :])
        original(self, *args, **kwargs)

    return __init__


def install() -> None:
    """Wrap the constructors (idempotent; call again to catch modules imported since).

    Only modules already imported are patched: importing one ourselves could change what
    the user's suite sees (``starlette.testclient`` warns on import, for one).
    """
    for module_name, class_name, name, position, isolate in TARGETS:
        key = (module_name, class_name)
        module = sys.modules.get(module_name)
        if key in _originals or module is None:
            continue
        cls = getattr(module, class_name, None)
        if cls is None:
            continue
        _originals[key] = cls.__init__
        cls.__init__ = _wrap_init(cls.__init__, name, position, isolate)


def uninstall() -> None:
    """Put every original constructor back."""
    for (module_name, class_name), original in list(_originals.items()):
        cls = getattr(sys.modules[module_name], class_name)
        cls.__init__ = original
        del _originals[(module_name, class_name)]
