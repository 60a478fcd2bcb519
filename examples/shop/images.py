"""A pure-Python thumbnailer: CPU work, like an image library's resize."""

from __future__ import annotations


def thumbnail(data: bytes, factor: int = 4) -> bytes:
    """Average each run of ``factor`` bytes: about 20 ms for 200 kB on a CI core."""
    out = bytearray()
    for i in range(0, len(data) - factor + 1, factor):
        out.append(sum(data[i : i + factor]) // factor)
    return bytes(out)
