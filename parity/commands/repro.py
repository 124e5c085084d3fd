"""`parity repro DIR`: list the kernel repros under DIR (written by `parity.repro.write_kernel_repros`) and run
their scripts; exit 1 if any reproduces a failure, 2 on bad input."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from parity.commands._common import EXIT_FAIL, check_device, out
from parity.errors import ParityError
from parity.optimized.ops import registry

# the repro modules load when the command runs, not when the CLI starts (every command module is imported then)
if TYPE_CHECKING:
    from parity.repro.listing import Repro


def repro(
    folder: Annotated[Path, typer.Argument(help="A report folder (its repro/) or any folder holding repro_<op>.json.")],
    run: Annotated[
        list[str] | None, typer.Option("--run", help="Run only this repro (repro_<op> or op); repeatable.")
    ] = None,
    list_only: Annotated[bool, typer.Option("--list", help="Only list the repros, run nothing.")] = False,
    backend: Annotated[str | None, typer.Option(help="Run each repro with this registered backend instead.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: each repro's own).")] = None,
    extract: Annotated[
        str | None, typer.Option(help="First run this case (as parity run) and write its repros into FOLDER/repro.")
    ] = None,
    plant: Annotated[
        str | None, typer.Option(help="With --extract: plant this selftest bug (parity run --plant).")
    ] = None,
) -> None:
    """List the kernel repros under FOLDER and run them against their reference twins."""
    from parity.repro import find_repros, run_and_extract, run_script
    from parity.repro.listing import select

    if plant is not None and extract is None:
        raise ParityError("--plant: only with --extract CASE")
    if device is not None:
        check_device(device)
    if extract is not None:
        report, paths = run_and_extract(extract, folder, device=device or "cpu", plant=plant)
        out.print(f"{'PASSED' if report.passed else 'FAILED'} {escape(extract)}: {escape(report.location or '-')}")
        out.print(f"{len(paths)} repro(s) written under {escape(str(folder / 'repro'))}")
    repros = find_repros(folder)
    if not repros and extract is None:
        raise ParityError(f"{folder}: no kernel repros here (repro_<op>.json with its script, at any depth)")
    chosen = select(repros, run) if run else repros
    check_backend(chosen, backend)
    for r in repros:
        out.print(escape(r.summary()))
    if list_only:
        return
    failed = []
    for r in chosen:
        code, text = run_script(r, backend, device)
        out.print(f"\n[bold]{escape(r.name)}[/bold] ({escape(str(r.script))})\n{escape(text)}")
        if code != 0:
            failed.append((r.name, code, text))
    if not chosen:
        out.print(f"no repros under {escape(str(folder))}")
    bad = [(name, text) for name, code, text in failed if code == 2]
    if bad:
        name, text = bad[0]
        said = [line.removeprefix("error: ") for line in text.splitlines() if line.startswith("error: ")]
        why = said[-1] if said else "(exit 2; output above)"
        raise ParityError(f"repro {name}: the script refused its files or options: {why}")
    out.print(f"{'FAILED' if failed else 'PASSED'} | {len(chosen) - len(failed)}/{len(chosen)} repros pass")
    if failed:
        raise typer.Exit(EXIT_FAIL)


def check_backend(repros: list["Repro"], backend: str | None) -> None:
    """`--backend NAME` must implement the op of every repro that runs (refused before any script starts)."""
    if backend is None:
        return
    for r in repros:
        impls = registry()[r.op]
        if backend not in impls:
            raise ParityError(f"--backend {backend!r}: op {r.op} ({r.name}) has no such backend; valid: "
                              f"{', '.join(sorted(impls))}")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("repro")(repro)
