"""`parity gate`: run a suite of cases for a CI job and decide pass / fail, optionally against a baseline.

A suite file (TOML) names its cases, relative to itself:

    name = "kernel-prs"
    cases = ["tiny", "batched.toml"]      # built-in names or case files

Every case runs as `parity run` does (its own noise model: bitwise for decode-exact cases, calibrated or default
otherwise; per-row gates, so a few bad rows are never diluted). With a baseline (the `gate.json` of an earlier run,
e.g. of the main branch) a site also fails when its own error grew more than `regression` times over the
baseline's, above its dtype floor: a kernel change that stays inside the noise model but doubles a site's error is
still reported.
"""

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from parity.cases import BUILTIN_DIR, Case, load_case
from parity.compare.thresholds import BF16_FLOOR
from parity.errors import ParityError
from parity.io import atomic_write_json, read_json
from parity.progress import Progress, within
from parity.report.folder import write_folder
from parity.report.summary import Invocation
from parity.run import RunReport, prepare_checkpoint, run_case


@dataclass(frozen=True)
class Suite:
    name: str
    cases: tuple[Case, ...]
    source: str


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_bytes().decode())
    except FileNotFoundError:
        raise ParityError(f"{path}: no such suite file") from None
    except IsADirectoryError:
        raise ParityError(f"{path}: a directory; expected a suite .toml file") from None
    except OSError as e:
        raise ParityError(f"{path}: cannot read the suite ({e.strerror})") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ParityError(f"{path}: not a readable TOML suite ({e})") from None
    unknown = sorted(set(data) - {"name", "cases"})
    if unknown:
        raise ParityError(f"{path}: unknown key(s) {unknown}; allowed: ['cases', 'name']")
    names = data.get("cases")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ParityError(f"{path}: 'cases' must be a non-empty list of case names or files")
    cases = []
    for n in names:
        rel = path.parent / n
        try:
            cases.append(load_case(str(rel) if Path(n).suffix else n))
        except ParityError as e:
            raise ParityError(f"{path}: cases entry {n!r}: {e}") from None
    seen: dict[str, str] = {}
    for n, c in zip(names, cases):
        if c.name in seen:
            raise ParityError(
                f"{path}: cases {seen[c.name]!r} and {n!r} are both named {c.name!r}: their report folders under "
                "--out would overwrite each other"
            )
        seen[c.name] = n
    name = data.get("name", path.stem)
    if not isinstance(name, str):
        raise ParityError(f"{path}: 'name' must be a string, got {name!r}")
    return Suite(name, tuple(cases), str(path))


@dataclass
class GateResult:
    suite: str
    cases: list[dict] = field(default_factory=list)  # per case: name, passed, location, sites
    regressions: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.cases) and not self.regressions


def load_baseline(path: str | Path) -> dict:
    path = Path(path)
    data = read_json(path, f"--baseline {path}: no such file", f"--baseline {path}: not a readable gate.json")
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise ParityError(f"--baseline {path}: expected a gate.json with a 'cases' list")
    cases = {}
    for i, c in enumerate(data["cases"]):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("sites", []), list):
            raise ParityError(f"--baseline {path}: cases[{i}]: expected an object with a 'name' and a 'sites' list")
        for j, site in enumerate(c.get("sites", [])):
            err = site.get("max_err") if isinstance(site, dict) else None
            keys_ok = isinstance(site, dict) and all(isinstance(site.get(k), str) for k in ("site", "field", "phase"))
            if not keys_ok or not isinstance(err, int | float) or isinstance(err, bool) or not err >= 0:
                raise ParityError(
                    f"--baseline {path}: cases[{i}].sites[{j}]: expected site, field, phase and a numeric "
                    f"max_err >= 0 (not NaN), got {site!r}"[:300]
                )
        if c["name"] in cases:
            raise ParityError(f"--baseline {path}: cases[{i}]: case {c['name']!r} is listed twice")
        cases[c["name"]] = c
    return cases


def regressions(report: RunReport, baseline: dict | None, factor: float) -> list[str]:
    if baseline is None or report.case not in baseline:
        return []
    before = {(s["site"], s["field"], s["phase"]): s["max_err"] for s in baseline[report.case].get("sites", [])}
    out = []
    for s in report.sites:
        old = before.get((s["site"], s["field"], s["phase"]))
        if old is not None and s["max_err"] > max(factor * old, BF16_FLOOR):
            out.append(f"{report.case}: {s['site']}:{s['field']} ({s['phase']}) error {s['max_err']:.3g} was {old:.3g}")
    return out


def run_gate(
    suite: Suite,
    out_dir: Path,
    baseline: dict | None = None,
    factor: float = 2.0,
    progress=None,
    steps: Progress | None = None,
) -> GateResult:
    """`progress(message)` names each case as it starts; `steps` follows the long steps inside it."""
    say = progress or (lambda m: None)
    result = GateResult(suite.name)
    for case in suite.cases:
        say(f"case {case.name}")
        ckpt = prepare_checkpoint(case, None, out_dir / case.name, within(steps, case.name))
        report = run_case(case, ckpt, progress=within(steps, case.name))
        # each case's report folder next to its checkpoint; repro.sh reruns the case alone with `parity run`
        builtin = Path(case.source).parent == BUILTIN_DIR
        write_folder(out_dir / case.name, report.to_dict(), Invocation.capture(case.name if builtin else case.source))
        result.regressions += regressions(report, baseline, factor)
        result.cases.append(
            {
                "name": case.name,
                "passed": report.passed,
                "location": report.location,
                "noise": report.noise,
                "sites": report.sites,
                "wall_s": report.wall_s,
                "report": str(out_dir / case.name / "report.html"),
            }  # fmt: skip
        )
    atomic_write_json(out_dir / "gate.json", {"suite": suite.name, "passed": result.passed, "cases": result.cases,
                                              "regressions": result.regressions})  # fmt: skip
    return result
