"""Helpers shared by the CLI command modules."""

from rich.console import Console

# stdout for results, stderr for the one-line errors
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
