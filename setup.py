"""The one compiled part: the per-step hooks in C (pytest_stallguard/loopwatch/_cstep.c).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built
(no C compiler, not Linux, not CPython) the install goes on and the Python versions of its
hooks do the same work, slower. ``STALLGUARD_NO_EXTENSIONS=1`` makes an installed copy use
them too.
"""

import platform
import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux") and platform.python_implementation() == "CPython":
    extensions.append(
        Extension(
            "pytest_stallguard.loopwatch._cstep",
            ["pytest_stallguard/loopwatch/_cstep.c"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
