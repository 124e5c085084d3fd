"""A `parity.progress.Progress` callback drawn with rich on stderr: one bar per step label, removed when the
command ends. Quiet (no callback at all) when stderr is not a terminal, so logs, pipes and `--json` runs see
nothing of it."""

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from parity.commands._common import err
from parity.progress import Progress as Callback


@contextmanager
def progress_bars() -> Iterator[Callback | None]:
    if not err.is_terminal:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=True) as bars:
        tasks: dict[str, int] = {}

        def update(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bars.add_task(label, total=total)
            bars.update(tasks[label], completed=done, total=total)

        yield update
