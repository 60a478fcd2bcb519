"""Every global patch stallguard makes goes through here.

One :class:`Patches` per owner (the traps, the loop watch, the pool watch, ...). Several
owners may patch the same attribute: each layer calls ``link.next``, and layers come off
in any order; removing a layer re-points the one above it, and removing the last puts the
original back exactly (or deletes our attribute when the original was inherited). Patches
that are not attributes (a loop's task factory, a ``gc.callbacks`` entry) are registered
with :meth:`Patches.undo` so that they are live and restorable the same way.

Libraries the app imports after a detector started (a fixture importing the app lazily)
are hooked as they are imported: :meth:`Patches.when_imported` runs a callback on the
module now if it is loaded, else right after its body ran. The finder that does it sits in
``sys.meta_path`` only while such a hook is live, and comes off with its owner's patches.

:func:`live` lists what is installed now; :func:`restore_all` takes everything off (the
plugin calls it when a run is interrupted, and the test suite checks after each test that
nothing is left).

A hook of ours that fails must never reach the app: :func:`hook_failed` records the
failure once (library, version, what) and the plugin turns it into a warning; the detector
turns itself off for that object and lets the app's call go on untouched.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = [
    "Link",
    "Live",
    "Patches",
    "hook_failed",
    "live",
    "restore_all",
    "take_warnings",
]

_MISSING = object()


class Link:
    """What a patch layer calls next: re-pointed when a layer below it is removed."""

    __slots__ = ("next",)

    def __init__(self, next_: Any) -> None:
        self.next = next_


@dataclass(frozen=True)
class Live:
    """One patch in place: who made it and what it replaced."""

    owner: str
    target: str
    name: str

    def __str__(self) -> str:
        return f"{self.target}.{self.name} (by {self.owner})"


class _Entry:
    """The layers on one attribute, bottom first, and what the target held before us."""

    __slots__ = ("layers", "own", "target")

    def __init__(self, target: Any, own: Any) -> None:
        self.target = target
        self.own = own
        self.layers: list[tuple[Any, Link, Patches]] = []


_lock = threading.RLock()
_entries: dict[tuple[int, str], _Entry] = {}
_owners: list[Patches] = []  # every Patches with something installed, oldest first


def _describe(target: Any) -> str:
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    name = getattr(target, "__name__", None)
    if isinstance(name, str) and type(target).__name__ == "module":
        return name
    return f"<{type(target).__module__}.{type(target).__qualname__} object>"


def _own(target: Any, name: str) -> Any:
    """What the target itself holds (a class's own __dict__: inherited is _MISSING)."""
    if isinstance(target, type):
        return vars(target).get(name, _MISSING)
    try:
        return vars(target).get(name, _MISSING)
    except TypeError:  # no __dict__ (slots, builtins): take what getattr sees
        return getattr(target, name, _MISSING)


class Patches:
    """One owner's patches; :meth:`restore` takes exactly these off, whatever is above."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._mine: list[tuple[Any, str, Any]] = []  # (target, name, wrapper) installed
        self._undos: list[tuple[str, str, Callable[[], None]]] = []

    def link(self, target: Any, name: str) -> Link:
        """A link to what ``target.name`` is now (kept current by :meth:`set`)."""
        return Link(getattr(target, name))

    def set(self, target: Any, name: str, new: Any, link: Link | None = None) -> None:
        """Install ``new`` as ``target.name``; a wrapper calls ``link.next`` for the rest."""
        link = link if link is not None else Link(None)
        with _lock:
            key = (id(target), name)
            entry = _entries.get(key)
            if entry is None:
                entry = _Entry(target, _own(target, name))
                _entries[key] = entry
            link.next = getattr(target, name)
            setattr(target, name, new)
            entry.layers.append((new, link, self))
            self._mine.append((target, name, new))
            if self not in _owners:
                _owners.append(self)

    def wrap(self, target: Any, name: str, make: Callable[[Link], Any]) -> Link:
        """Install ``make(link)`` as ``target.name``; returns the link it calls through."""
        link = self.link(target, name)
        self.set(target, name, make(link), link)
        return link

    def undo(self, what: str, fn: Callable[[], None], target: str = "") -> None:
        """Register a patch that is not an attribute: ``fn`` takes it off (once)."""
        with _lock:
            self._undos.append((target or what, what, fn))
            if self not in _owners:
                _owners.append(self)

    def when_imported(self, name: str, callback: Callable[[ModuleType], object]) -> None:
        """Call ``callback(module)`` for module ``name``: now if it is imported, and each
        time it is imported while this hook is live (until :meth:`restore`).

        The callback runs in the importing thread right after the module's body ran (for
        ``import a.b``, ``a`` runs first), before ``import`` returns to the importer, under
        this module's lock (so never while the owner's patches come off). It must be quick
        and import only what the module already imported. The call for a module already
        loaded runs here, in the caller's thread, outside the lock (should another thread
        still be running the module's body, the callback's imports wait for it to finish).
        An exception of the callback is noted with :func:`hook_failed`; the import goes on.
        Other imports pay one dict lookup while a hook is live, none when none is.
        """
        hook = (self, callback)
        with _lock:
            _import_hooks.setdefault(name, []).append(hook)
            if not any(f is _finder for f in sys.meta_path):
                sys.meta_path.insert(0, _finder)
            self.undo(f"import hook for {name}", lambda: _unhook(name, hook), "sys.meta_path")
            module = sys.modules.get(name)
        if isinstance(module, ModuleType):
            _run_hook(name, module, hook)

    def live(self) -> list[Live]:
        with _lock:
            found = [Live(self.owner, _describe(t), n) for t, n, _ in self._mine]
            found += [Live(self.owner, t, w) for t, w, _ in self._undos]
            return found

    def restore(self) -> None:
        """Take off every patch of this owner, newest first. Never raises."""
        with _lock:
            while self._undos:
                _, _, fn = self._undos.pop()
                with contextlib.suppress(Exception):
                    fn()
            while self._mine:
                target, name, new = self._mine.pop()
                _remove(target, name, new)
            if self in _owners:
                _owners.remove(self)

    def __bool__(self) -> bool:
        return bool(self._mine or self._undos)


def _remove(target: Any, name: str, new: Any) -> None:
    key = (id(target), name)
    entry = _entries.get(key)
    if entry is None:
        return
    layers = entry.layers
    index = next((i for i, (w, _, _) in enumerate(layers) if w is new), None)
    if index is None:
        return
    _, link, _ = layers.pop(index)
    if index < len(layers):  # a layer above ours: make it skip ours
        layers[index][1].next = link.next
    elif _own(target, name) is new:
        if not layers and entry.own is _MISSING:
            with contextlib.suppress(AttributeError, TypeError):
                delattr(target, name)
        else:
            setattr(target, name, link.next)
    # else: someone patched over us; our layer is gone from the chain's bookkeeping and
    # the outside patch still calls it, which calls what was below us: harmless.
    if not layers:
        del _entries[key]


def live() -> list[Live]:
    """Every patch of ours installed now, oldest owner first."""
    with _lock:
        return [item for owner in _owners for item in owner.live()]


def restore_all() -> list[Live]:
    """Take every patch of every owner off (newest owner first); returns what was live."""
    with _lock:
        found = live()
        for owner in reversed(list(_owners)):
            owner.restore()
        return found


# -- modules imported later ----------------------------------------------------------------

_Hook = tuple["Patches", Callable[[ModuleType], object]]
_import_hooks: dict[str, list[_Hook]] = {}  # module name -> hooks, oldest first
_finding = threading.local()  # .names: the hooked names this thread is looking up


def _unhook(name: str, hook: _Hook) -> None:
    hooks = _import_hooks.get(name, [])
    for i, h in enumerate(hooks):
        if h is hook:
            del hooks[i]
            break
    if not hooks:
        _import_hooks.pop(name, None)
    if not _import_hooks:  # the last hook: nothing of ours stays in sys.meta_path
        for i, f in enumerate(list(sys.meta_path)):
            if f is _finder:
                with contextlib.suppress(ValueError, IndexError):
                    del sys.meta_path[i]
                break


def _run_hook(name: str, module: ModuleType, hook: _Hook) -> None:
    owner, callback = hook
    try:
        callback(module)
    except Exception as exc:
        with contextlib.suppress(Exception):
            hook_failed(owner.owner, name.partition(".")[0], f"{name} when imported", exc)


def _imported(name: str, module: ModuleType) -> None:
    """The module's body ran: every hook live now gets it (never raises)."""
    with contextlib.suppress(Exception), _lock:
        for hook in list(_import_hooks.get(name, ())):
            _run_hook(name, module, hook)


class _HookedLoader:
    """The module's own loader, followed by the hooks. ``module.__loader__`` and
    ``module.__spec__.loader`` are the module's own loader again before its body runs, so
    the module (and whoever reads its loader later) never sees this one."""

    def __init__(self, loader: Any, name: str) -> None:
        self.loader = loader
        self.name = name

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        __tracebackhide__ = True  # the module's own error, as pytest would show it
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        if getattr(module, "__loader__", None) is self:
            with contextlib.suppress(AttributeError, TypeError):
                module.__loader__ = self.loader
        self.loader.exec_module(module)  # the module's own errors pass through untouched
        _imported(self.name, module)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.loader, attr)


class _PostImportFinder:
    """First in ``sys.meta_path`` while a hook is live. For a hooked name it asks the
    finders after it for the spec (as the import system would) and gives the spec's loader
    a :class:`_HookedLoader`; for every other name it returns None at once."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in _import_hooks:  # every other import: one dict lookup
            return None
        names: set[str] | None = getattr(_finding, "names", None)
        if names is None:
            names = _finding.names = set()
        if fullname in names:  # another finder asked the import system again (wrapt does)
            return None
        names.add(fullname)
        try:
            spec = self._spec(fullname, path, target)
            loader = getattr(spec, "loader", None)
            if (
                spec is not None
                and loader is not None
                and hasattr(loader, "exec_module")
                and not isinstance(loader, _HookedLoader)
            ):
                spec.loader = _HookedLoader(loader, fullname)  # type: ignore[assignment]
            return spec
        except Exception:
            # A finder's own error (or ours): step aside; the import system asks the
            # finders itself and the importer sees exactly what it would without us.
            return None
        finally:
            names.discard(fullname)

    def _spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> ModuleSpec | None:
        for finder in list(sys.meta_path):
            if finder is self:
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec  # type: ignore[no-any-return]
        return None

    def __repr__(self) -> str:
        return "<stallguard post-import hooks>"


_finder = _PostImportFinder()


# -- hooks that fail ------------------------------------------------------------------------

_warned: set[tuple[str, str, str]] = set()
_pending: list[str] = []


def version_of(distribution: str) -> str:
    """The installed version, or the Python version for a standard-library module."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        if distribution.partition(".")[0] in sys.stdlib_module_names:
            return f"(standard library of Python {platform.python_version()})"
        return "(version unknown)"


def hook_failed(owner: str, library: str, what: str, exc: BaseException) -> None:
    """A hook of ours failed: note it once (turned into a pytest warning), never raise.

    The caller turns its detector off for the object concerned and lets the app's call go
    on exactly as it would without the plugin.
    """
    key = (owner, library, what)
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
        _pending.append(
            f"stallguard: {owner} cannot watch {what} with {library} {version_of(library)} "
            f"({type(exc).__name__}: {exc}); that check is off for it, the app runs as usual."
        )


def take_warnings() -> list[str]:
    """The failure notes not yet shown (each once per process)."""
    with _lock:
        notes = list(_pending)
        _pending.clear()
        return notes
