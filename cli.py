"""The `parity` command line. Commands are thin: each one parses options and calls into the `parity` package."""

import sys

import typer

from parity.errors import ParityError

app = typer.Typer(
    name="parity",
    help="Correctness and layer-bisect harness for DeepSeek-V4 inference kernels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Correctness and layer-bisect harness for DeepSeek-V4 inference kernels."""


def _register() -> None:
    from parity.commands import register_all

    register_all(app)


def main() -> None:
    """Entry point: one-line errors and exit 2 for bad input, never a traceback."""
    _register()
    try:
        app()
    except ParityError as e:
        from rich.markup import escape

        from parity.commands._common import err

        err.print(f"[red]error:[/red] {escape(str(e))}", markup=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
