"""The `parity` command line. Commands are thin: each one parses options and calls into the `parity` package."""

import gc
import sys

import typer

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer depends on click
    from click.exceptions import ClickException, UsageError

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


def _fail(message: str, code: int) -> None:
    """Print one `error: ...` line on stderr (newlines folded) and exit with `code`."""
    from rich.markup import escape

    from parity.commands._common import err

    line = " ".join(message.split())
    err.print(f"[red]error:[/red] {escape(line)}", markup=True)
    sys.exit(code)


def _usage_message(e: ClickException) -> str:
    ctx = getattr(e, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"{e.format_message()}{hint}"


def _load() -> None:
    """Import the package (torch with it) and the commands with the garbage collector off, then freeze what they made.

    torch's import leaves ~250k long-lived objects, which every full collection walks again and frees almost none
    of: the passes while the modules load and at interpreter exit cost 0.3-0.6 s of each command's CPU. Frozen
    (`gc.freeze`), they are left out of every later pass; what a command allocates is collected as usual. Only the
    first call in a process freezes (an in-process caller, e.g. the tests, keeps its later objects collectable)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        _register()
    finally:
        if not gc.get_freeze_count():
            gc.freeze()
        if enabled:
            gc.enable()


def main() -> None:
    """Entry point: one-line errors and exit 2 for bad input and usage, never a traceback or a usage box."""
    _load()
    from parity.errors import ParityError  # not at the top: the package loads in `_load`, with the collector off

    try:
        # standalone_mode=False: click's usage errors reach us instead of being drawn as multi-line boxes
        code = app(standalone_mode=False)
    except ParityError as e:
        _fail(str(e), e.exit_code)
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `parity` alone: the help text is what the user asked for
            e.show()
            sys.exit(2)
        _fail(_usage_message(e), 2)
    except ClickException as e:
        _fail(e.format_message(), 2)
    except OSError as e:
        # an unreadable / unwritable path or a full disk the checks could not foresee: name it, no traceback
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}", 2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
