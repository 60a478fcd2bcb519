"""Attribute requests the test sends through its own client, with no fixture of ours.

``--stall-guard`` runs an existing suite unchanged. Its tests build their own
``httpx.ASGITransport``, ``asgi_lifespan.LifespanManager`` or Starlette ``TestClient``; we
wrap the app they are given with :func:`context.attributed`, which adds the request label
to the context and changes nothing the app sees.

The constructors are wrapped through :mod:`.patching` (owner ``"request labels"``), in
modules imported before :func:`install` or later (an import hook, live until
:func:`uninstall`): the wrapper takes exactly what the original takes (same signature,
arguments passed through untouched) and, should wrapping the app fail, notes it once with
:func:`patching.hook_failed`, leaves that class alone until :func:`uninstall` and builds
the client exactly as without the plugin.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from . import context, guard, patching

OWNER = "request labels"

# (module, class, distribution, name of the app parameter, its position after self,
#  runs the app inline)
TARGETS = (
    ("httpx", "ASGITransport", "httpx", "app", 0, True),
    ("asgi_lifespan", "LifespanManager", "asgi-lifespan", "app", 0, False),
    ("starlette.testclient", "TestClient", "starlette", "app", 0, True),
)

# Transports that run the app, wrapped at send time too: a client built before the plugin
# could wrap its constructor (the FastAPI tutorial's module-level ``TestClient(app)``,
# built while pytest imports the test module) still gets its requests labelled.
# (module, class, distribution, method, is async)
SEND_TARGETS = (
    ("httpx", "ASGITransport", "httpx", "handle_async_request", True),
    ("starlette.testclient", "_TestClientTransport", "starlette", "handle_request", False),
)

_patches = patching.Patches(OWNER)
_wrapped: set[tuple[str, str]] = set()  # constructors wrapped now
_hooked: set[str] = set()  # modules whose import hook is live
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
    """Wrap the constructors and send methods (idempotent).

    We never import these modules ourselves: that could change what the user's suite sees
    (``starlette.testclient`` warns on import, for one). Those already imported are
    wrapped now, the others as the suite imports them (a fixture importing ``TestClient``
    lazily), until :func:`uninstall`.
    """
    if not _patches:  # nothing of ours in place (also after patching.restore_all())
        _wrapped.clear()
        _hooked.clear()
    for module_name in dict.fromkeys(t[0] for t in (*TARGETS, *SEND_TARGETS)):
        if module_name not in _hooked:
            _hooked.add(module_name)
            _patches.when_imported(module_name, _wrap_module)


def _wrap_module(module: ModuleType) -> None:
    _install_init()
    _install_send()


def _install_init() -> None:
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


def _labelled_transport(transport: Any) -> Any:
    """A shallow copy of the transport whose app is labelled (the user's object is left
    as it is), or the transport itself when its app already is."""
    app = transport.app
    if getattr(app, context._WRAPPED, False):
        return transport
    proxy = copy.copy(transport)
    proxy.app = context.attributed(app, isolate=True)
    return proxy


def _wrap_send(
    link: patching.Link, key: tuple[str, str], distribution: str, is_async: bool
) -> Callable[..., Any]:
    def label(transport: Any) -> Any:  # (a guard is active: see the wrappers below)
        if key in _off:
            return transport
        try:
            return _labelled_transport(transport)
        except Exception as exc:  # ours: the request goes out as without the plugin
            _off.add(key)
            patching.hook_failed(OWNER, distribution, f"{key[0]}.{key[1]}", exc)
            return transport

    # Every request comes through here: the common case (no guard, or a transport built
    # after the constructor was wrapped, whose app is labelled already) is decided inline.
    wrapped = context._WRAPPED

    if is_async:

        @functools.wraps(link.next)
        async def handle_async_request(self: Any, request: Any) -> Any:
            try:
                as_is = guard._active is None or getattr(self.app, wrapped, False) is True
            except Exception:  # label() decides, and notes the failure
                as_is = False
            return await link.next(self if as_is else label(self), request)

        return handle_async_request

    @functools.wraps(link.next)
    def handle_request(self: Any, request: Any) -> Any:
        try:
            as_is = guard._active is None or getattr(self.app, wrapped, False) is True
        except Exception:  # label() decides, and notes the failure
            as_is = False
        return link.next(self if as_is else label(self), request)

    return handle_request


def _install_send() -> None:
    for module_name, class_name, distribution, method, is_async in SEND_TARGETS:
        key = (module_name, f"{class_name}.{method}")
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if key in _wrapped or not isinstance(cls, type) or not hasattr(cls, method):
            continue
        make = functools.partial(
            _wrap_send, key=key, distribution=distribution, is_async=is_async
        )
        _patches.wrap(cls, method, make)
        _wrapped.add(key)


def uninstall() -> None:
    """Put every original constructor back."""
    _patches.restore()
    _wrapped.clear()
    _hooked.clear()
    _off.clear()
