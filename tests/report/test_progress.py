"""Progress of the long steps: the callback hears every step of a run with its counts; the CLI draws it only on a
terminal, so logs and `--json` see nothing of it."""

import io

from rich.console import Console

from parity.capture import runs
from parity.cases import load_case
from parity.commands import _common, _progress
from parity.progress import within
from parity.run import prepare_checkpoint, run_inputs


def test_steps_report_checkpoint_requests_and_engine_steps(tmp_path):
    heard: list[tuple] = []
    case = load_case("tiny")
    ckpt = prepare_checkpoint(case, None, tmp_path, lambda *a: heard.append(a))
    assert heard == [("writing the synthetic checkpoint", 0, 1), ("writing the synthetic checkpoint", 1, 1)]
    inp = run_inputs(case, ckpt)
    heard.clear()
    tg = runs.targets(inp, progress=within(lambda *a: heard.append(a), "targets"))
    n = len(inp.prompts)
    assert heard == [("targets: the reference generates each request", i + 1, n) for i in range(n)]
    heard.clear()
    runs.engine_capture(inp, tg, name="chained", progress=within(lambda *a: heard.append(a), "chained"))
    assert heard and {h[0] for h in heard} == {"chained: engine steps"} and {h[2] for h in heard} == {None}
    # one call per engine step in order, from step 1 (MTP draft phases share their step's number)
    steps = [h[1] for h in heard]
    assert steps[0] == 1 and steps == sorted(steps) and max(steps) > n


def test_bars_only_on_a_terminal(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(_progress, "err", Console(file=log))  # a file, not a terminal: no callback, nothing drawn
    with _progress.progress_bars() as p:
        assert p is None
    assert log.getvalue() == ""
    screen = io.StringIO()
    monkeypatch.setattr(_progress, "err", Console(file=screen, force_terminal=True, width=100))
    with _progress.progress_bars() as p:
        p("forced: engine steps", 7, None)
        p("golden: each request alone on the engine's schedule", 2, 4)
    assert "forced: engine steps" in screen.getvalue() and "2/4" in screen.getvalue()
    assert _common.err.file is not screen


def test_a_log_run_shows_no_progress(failing):
    # the session's runs write to pipes: their stderr holds no bar
    assert "engine steps" not in failing.err and "engine steps" not in failing.out
