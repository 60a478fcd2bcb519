"""Settings: one resolver for call arguments > marker > CLI > ini > built-in default.

Every value is validated where it enters, and a bad one raises :class:`ConfigError` naming
the value, where it came from and what is valid. The plugin turns that into a
``pytest.UsageError`` (for CLI and ini) or a test error (for a marker).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError

TRAP_MODES = ("record", "raise", "off")
LIFESPAN_MODES = ("report", "fail")
POOL_KINDS = ("threads", "sqlalchemy", "httpx", "asyncpg")

DEFAULT_MAX_CANARY_SLOWDOWN = 20.0


@dataclass(frozen=True)
class Settings:
    """Effective settings for one test (or, without marker and call, for the session)."""

    threshold_ms: float = 20.0
    pool_wait_ms: float = 100.0
    # Whether a marker, the ini or a call set pool_wait_ms. Thread pools use pool_wait_ms
    # either way; DB and HTTP pools bound plain waits by it only when it was set.
    pool_wait_set: bool = False
    traps: str = "record"
    allow: tuple[str, ...] = ()
    lifespan: str = "report"
    n: int = 50
    concurrency: int | None = None
    canary: str | None = None
    every_ms: float = 10.0
    max_canary_slowdown: float = DEFAULT_MAX_CANARY_SLOWDOWN
    leak_check: bool = True
    pools: Mapping[str, int] = field(default_factory=dict)
    startup_timeout: float = 30.0
    shutdown_timeout: float = 30.0

    def header(self) -> str:
        return (
            f"stallguard: threshold={self.threshold_ms:g}ms pool_wait={self.pool_wait_ms:g}ms "
            f"traps={self.traps} "
            f"lifespan={self.lifespan} max_canary_slowdown={self.max_canary_slowdown:g}x "
            f"startup_timeout={self.startup_timeout:g}s"
            + (f" allow={len(self.allow)} pattern(s)" if self.allow else "")
        )


# -- validators: each takes (value, where) and returns the clean value -------------------


def _number(name: str, *, minimum: float = 0.0, integer: bool = False) -> Callable[..., Any]:
    kind = "a whole number" if integer else "a number"

    def check(value: Any, where: str) -> Any:
        try:
            if isinstance(value, bool):
                raise TypeError
            number = int(value) if integer else float(value)
            if integer and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str) and integer and not value.strip().lstrip("-").isdigit():
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(
                f"{name}={value!r} ({where}) is not valid: give {kind} greater than {minimum:g}"
            ) from None
        if number <= minimum:
            raise ConfigError(
                f"{name}={value!r} ({where}) is not valid: give {kind} greater than {minimum:g}"
            )
        return number

    return check


def _choice(name: str, choices: Sequence[str]) -> Callable[..., Any]:
    def check(value: Any, where: str) -> Any:
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise ConfigError(
                f"{value!r} is not a valid {name} ({where}). Valid values: {', '.join(choices)}"
            )
        return text

    return check


def _bool(name: str) -> Callable[..., Any]:
    def check(value: Any, where: str) -> Any:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} ({where}) is not valid: give true or false")

    return check


def _optional(check: Callable[..., Any]) -> Callable[..., Any]:
    def inner(value: Any, where: str) -> Any:
        return None if value is None else check(value, where)

    return inner


def _allow(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.splitlines()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"allow={value!r} ({where}) is not valid: give a list of 'module.function' or "
            "'path/to/file.py:function' patterns"
        )
    return tuple(v.strip() for v in value if v.strip())


def _path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(
            f"canary={value!r} ({where}) is not valid: give a path on the app such as '/health'"
        )
    return value


def pools_spec(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"pools={value!r} ({where}) is not valid: give a dict such as "
            '{"threads": 2, "sqlalchemy": 2, "httpx": 2}'
        )
    out = {}
    for key, size in value.items():
        if key not in POOL_KINDS:
            raise ConfigError(
                f"pools key {key!r} ({where}) is not valid. Valid keys: {', '.join(POOL_KINDS)}"
            )
        out[key] = _number(f"pools[{key!r}]", integer=True)(size, where)
    return out


VALIDATORS: dict[str, Callable[..., Any]] = {
    "threshold_ms": _number("stall_threshold_ms"),
    "pool_wait_ms": _number("pool_wait_ms"),
    "traps": _choice("traps mode", TRAP_MODES),
    "allow": _allow,
    "lifespan": _choice("lifespan mode", LIFESPAN_MODES),
    "n": _number("n", integer=True),
    "concurrency": _optional(_number("concurrency", integer=True)),
    "canary": _optional(_path),
    "every_ms": _number("every_ms"),
    "max_canary_slowdown": _number("max_canary_slowdown", minimum=1.0),
    "leak_check": _bool("leak_check"),
    "pools": pools_spec,
    "startup_timeout": _number("startup_timeout"),
    "shutdown_timeout": _number("shutdown_timeout"),
}

# Marker keyword -> settings field.
MARKER_KEYS = {
    "n": "n",
    "concurrency": "concurrency",
    "canary": "canary",
    "every_ms": "every_ms",
    "max_canary_slowdown": "max_canary_slowdown",
    "stall_threshold_ms": "threshold_ms",
    "pool_wait_ms": "pool_wait_ms",
    "traps": "traps",
    "leak_check": "leak_check",
    "allow": "allow",
    "pools": "pools",
    "lifespan": "lifespan",
    "startup_timeout": "startup_timeout",
    "shutdown_timeout": "shutdown_timeout",
}

assert set(MARKER_KEYS.values()) <= {f.name for f in fields(Settings)}


def layer(base: Settings, values: Mapping[str, Any], where: str) -> Settings:
    """``base`` with ``values`` (settings field names) validated and applied on top."""
    clean = {}
    for name, value in values.items():
        if value is None and name not in ("concurrency", "canary"):
            continue
        clean[name] = VALIDATORS[name](value, where)
    if "pool_wait_ms" in clean:
        clean["pool_wait_set"] = True
    if "allow" in clean:  # allow patterns add up across layers
        clean["allow"] = base.allow + tuple(p for p in clean["allow"] if p not in base.allow)
    return replace(base, **clean)


def marker_values(args: Sequence[Any], kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Map ``@pytest.mark.concurrency(...)`` keywords to settings fields."""
    if args:
        raise ConfigError(
            f"@pytest.mark.concurrency takes keywords only ({where}), got positional {args!r}. "
            f"Valid keywords: {', '.join(sorted(MARKER_KEYS))}"
        )
    unknown = sorted(set(kwargs) - set(MARKER_KEYS))
    if unknown:
        raise ConfigError(
            f"@pytest.mark.concurrency got unknown keyword(s) {', '.join(unknown)} ({where}). "
            f"Valid keywords: {', '.join(sorted(MARKER_KEYS))}"
        )
    return {MARKER_KEYS[k]: v for k, v in kwargs.items()}
