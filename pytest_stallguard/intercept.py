"""Attribute requests the test sends through its own client, with no fixture of ours.

``--stall-guard`` runs an existing suite unchanged. Its tests build their own
``httpx.ASGITransport``, ``asgi_lifespan.LifespanManager`` or Starlette ``TestClient``; we
wrap the app they are given with :func:`context.attributed`, which adds the request label
to the context and changes nothing the app sees.

The constructors are wrapped through :mod:`.patching` (owner ``"request labels"``): the
wrapper takes exactly what the original takes (same signature, arguments passed through
untouched) and, should wrapping the app fail, notes it once with
:func:`patching.hook_failed`, leaves that class alone until :func:`uninstall` and builds
the client exactly as without the plugin.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from . import context, patching

OWNER = "request labels"

# (module, class, distribution, name of the app parameter, its position after self,
#  runs the app inline)
TARGETS = (
    ("httpx", "ASGITransport", "httpx", "app", 0, True),
    ("asgi_lifespan", "LifespanManager", "asgi-lifespan", "app", 0, False),
    ("starlette.testclient", "TestClient", "starlette", "app", 0, True),
)

_patches = patching.Patches(OWNER)
_wrapped: set[tuple[str, str]] = set()  # constructors wrapped now
_off: set[tuple[str, str]] = set()  # constructors whose wrapping failed (until uninstall)


def _labelled(
    args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int, isolate: bool
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The same arguments with the app wrapped by :func:`context.attributed`."""
    if name in kwargs:
        kwargs = {**kwargs, name: context.attributed(kwargs[name], isolate=isolate)}
    elif len(args) > position:
        wrapped = context.attributed(args[position], isolate=isolate)
        args = (*args[:position], wrapped, *args[position + 1 :])
    return args, kwargs


def _wrap_init(
    link: patching.Link,
    key: tuple[str, str],
    distribution: str,
    name: str,
    position: int,
    isolate: bool,
) -> Callable[..., Any]:
    @functools.wraps(link.next)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if key not in _off:
            try:
                args, kwargs = _labelled(args, kwargs, name, position, isolate)
            except Exception as exc:  # ours: the client is built as without the plugin
                _off.add(key)
                patching.hook_failed(OWNER, distribution, f"{key[0]}.{key[1]}", exc)
        return link.next(self, *args, **kwargs)

    return __init__


def install() -> None:
    """Wrap the constructors (idempotent; call again to catch modules imported since).

    Only modules already imported are patched: importing one ourselves could change what
    the user's suite sees (``starlette.testclient`` warns on import, for one).
    """
    if not _patches:  # nothing of ours in place (also after patching.restore_all())
        _wrapped.clear()
    for module_name, class_name, distribution, name, position, isolate in TARGETS:
        key = (module_name, class_name)
        module = sys.modules.get(module_name)
        if key in _wrapped or module is None:
            continue
        cls = getattr(module, class_name, None)
        if not isinstance(cls, type):
            continue
        make = functools.partial(
            _wrap_init, key=key, distribution=distribution, name=name, position=position,
            isolate=isolate,
        )
        _patches.wrap(cls, "__init__", make)
        _wrapped.add(key)


def uninstall() -> None:
    """Put every original constructor back."""
    _patches.restore()
    _wrapped.clear()
    _off.clear()
