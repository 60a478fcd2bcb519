"""Errors the plugin raises."""

from __future__ import annotations

from collections.abc import Sequence

from .model import Finding


class StallguardError(Exception):
    """Base of every error this plugin raises."""


class BlockingCallError(StallguardError):
    """Raised at the call in ``traps=raise`` mode (a debugging aid)."""


class ConfigError(StallguardError, ValueError):
    """A setting has a bad value; the message names the value, its source and what is valid."""


class CanaryError(StallguardError, ValueError):
    """The canary path cannot be a canary: it does not exist or fails before any load."""


class AppLoadError(StallguardError):
    """The app under test could not be found or is not an ASGI app."""


class StallFindings(AssertionError):
    """A test failed because the guard found something. Carries the findings."""

    def __init__(self, message: str, findings: Sequence[Finding]) -> None:
        super().__init__(message)
        self.findings = list(findings)
