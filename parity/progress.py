"""Progress of the long steps of a job, as a callback passed down explicitly (no globals).

`progress(label, done, total)`: `label` names the step ("engine steps (forced)", "reference (request 2/4)"),
`done` counts its units, `total` is their number or None when unknown (the engine's step count). A job calls it
as it goes; a caller that passes nothing gets no calls. The CLI draws it on stderr (`parity.commands._progress`).
"""

from collections.abc import Callable

Progress = Callable[[str, int, int | None], None]


def within(progress: Progress | None, prefix: str) -> Progress | None:
    """`progress` with every label prefixed (`forced: engine steps`): one step function, several runs."""
    if progress is None:
        return None
    return lambda label, done, total: progress(f"{prefix}: {label}", done, total)


def step(progress: Progress | None, label: str, done: int, total: int | None = None) -> None:
    """Report one step, if anyone listens."""
    if progress is not None:
        progress(label, done, total)
