"""CLI commands. Each module here defines `register(app)`; logic lives in the package, not in these modules."""

import importlib
import pkgutil

import typer


def register_all(app: typer.Typer) -> None:
    """Import every command module (alphabetical order) and let it add its commands to `app`."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(app)
