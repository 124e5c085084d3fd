"""Importing the data path's compiled loops (numba) on first use, or None where they cannot load.

numba's import costs ~0.7 s, which commands that never run a loop should not pay; and a source tree on a GPU image
may lack numba (a dependency), or numba may find no writable place for its cache (its decorators raise then). Either
way the caller runs its torch form. Used by the compare tile loop and the dump stats loop.
"""

import importlib
from types import ModuleType


def load_compiled(module: str) -> ModuleType | None:
    """`module` imported, or None where numba is missing or cannot cache."""
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError, OSError):
        return None
