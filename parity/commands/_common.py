"""Helpers shared by the CLI command modules."""

import sys

from rich.console import Console

# stdout for results, stderr for the one-line errors; piped output (CI logs, `| less`) gets wide tables instead of
# rich's 80-column fallback
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
