"""Slow upstream services for tests: respx fakes and real loopback servers.

- :mod:`.fake`: ``slow_upstream("https://...")``, respx fakes that honour the caller's
  timeouts and pool limits (:class:`SlowUpstreams`, :class:`Upstream`);
- :mod:`.server`: ``slow_upstream.serve()``, a real HTTP/1.1 server on 127.0.0.1
  (:class:`Server`, :func:`serve`);
- :mod:`.calls`: what both share, the knobs and the call log (:class:`Call`).
"""

from __future__ import annotations

from .calls import Call
from .fake import MISSING_TIMEOUT_HELP, SlowUpstreams, Upstream, slow_upstreams
from .server import Server, serve

__all__ = [
    "MISSING_TIMEOUT_HELP",
    "Call",
    "Server",
    "SlowUpstreams",
    "Upstream",
    "serve",
    "slow_upstreams",
]
