"""The thumbnail worker of the fixed shop, a process of its own: `python -m shop.worker DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

from .images import thumbnail


def process(directory: Path) -> int:
    done = 0
    for upload in sorted(directory.glob("*.bin")):
        target = upload.with_suffix(".thumb")
        if not target.exists():
            target.write_bytes(thumbnail(upload.read_bytes()))
            done += 1
    return done


if __name__ == "__main__":
    print(f"{process(Path(sys.argv[1]))} thumbnails made")
