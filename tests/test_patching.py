"""The one patch layer: layers on one attribute come off in any order, exactly."""

from __future__ import annotations

import types

import pytest

from pytest_stallguard import patching


def _module() -> types.ModuleType:
    mod = types.ModuleType("fake_mod")
    mod.f = lambda x: ("orig", x)  # type: ignore[attr-defined]
    return mod


def _layer(tag: str):  # type: ignore[no-untyped-def]
    def make(link: patching.Link):  # type: ignore[no-untyped-def]
        return lambda x: (tag, link.next(x))

    return make


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (1, 2, 0), (0, 2, 1)])
def test_layers_come_off_in_any_order(order: tuple[int, ...]) -> None:
    mod = _module()
    original = mod.f
    owners = [patching.Patches(f"owner{i}") for i in range(3)]
    for i, owner in enumerate(owners):
        owner.wrap(mod, "f", _layer(str(i)))
    assert mod.f(1) == ("2", ("1", ("0", ("orig", 1))))
    remaining = [0, 1, 2]
    for i in order:
        owners[i].restore()
        remaining.remove(i)
        expected: object = ("orig", 1)
        for j in remaining:
            expected = (str(j), expected)
        assert mod.f(1) == expected
    assert mod.f is original
    assert not patching.live()


class Base:
    def method(self) -> str:
        return "base"


class Child(Base):
    pass


def test_inherited_attribute_is_deleted_again_not_copied() -> None:
    owner = patching.Patches("t")
    owner.wrap(Child, "method", lambda link: lambda self: "ours+" + link.next(self))
    assert Child().method() == "ours+base"
    assert "method" in vars(Child)
    owner.restore()
    assert "method" not in vars(Child)
    assert Child().method() == "base"


def test_live_lists_attribute_and_undo_patches_and_restore_all_clears_them() -> None:
    mod = _module()
    undone: list[str] = []
    owner = patching.Patches("traps")
    owner.set(mod, "f", lambda x: x)
    owner.undo("task factory", lambda: undone.append("factory"), target="loop")
    live = patching.live()
    assert [(x.owner, x.target, x.name) for x in live] == [
        ("traps", "fake_mod", "f"),
        ("traps", "loop", "task factory"),
    ]
    assert patching.restore_all() == live
    assert undone == ["factory"]
    assert mod.f(3) == ("orig", 3)
    assert patching.live() == []


def test_a_failing_undo_does_not_stop_the_rest() -> None:
    mod = _module()
    original = mod.f
    owner = patching.Patches("t")
    owner.set(mod, "f", lambda x: x)

    def boom() -> None:
        raise RuntimeError("undo failed")

    owner.undo("broken", boom)
    owner.restore()
    assert mod.f is original
    assert not owner


def test_hook_failure_is_noted_once_with_library_and_version() -> None:
    patching.take_warnings()
    for _ in range(3):
        patching.hook_failed("pool watch", "httpx", "a pool", TypeError("no weakref"))
    notes = patching.take_warnings()
    assert len(notes) == 1
    assert "httpx " + patching.version_of("httpx") in notes[0]
    assert "TypeError: no weakref" in notes[0]
    assert patching.take_warnings() == []


def test_a_standard_library_hook_names_the_python_version() -> None:
    import platform

    assert platform.python_version() in patching.version_of("sqlite3")
    assert patching.version_of("no-such-distribution-xyz") == "(version unknown)"
