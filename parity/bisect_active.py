"""Active bisect: replays of the optimized engine with parts of it replaced by the reference, to name the first
layer whose own error crosses its gate, its sub-module, and the first phase / step / request / position.

Replay 1 is the engine teacher-forced at every site (`capture.forcing`): each site computes from the reference's
inputs, so every layer's and every sub-module's own error is measured at once, and the first failing site in
execution order is the first bad layer and sub-module. (Where only block boundaries can be replaced, a binary
search over hybrid runs needs ceil(log2 L) replays to find that layer; with a tap at every site one replay does.)

Replay 2 confirms it in isolation: a hybrid run, the reference up to that layer (its input streams forced) and the
optimized engine on its own from there, nothing forced inside the layer. The same site must fail again, so the
finding cannot be an artefact of forcing (a site that only fails with its neighbours' values substituted).
"""

import math
import time
from dataclasses import dataclass, field

from parity.capture import runs
from parity.capture.session import Captures, add_forced, judge
from parity.compare.rows import RowStore
from parity.compare.thresholds import NoiseModel
from parity.compare.verdict import Verdict, judge_run


@dataclass
class ActiveBisect:
    replays: int
    bound: int  # ceil(log2 L) + 2 for L blocks
    layer: int | None = None
    site: str | None = None
    submodule: str | None = None
    phase: str | None = None
    where: tuple | None = None  # (step, request, position) of the first failing row
    confirmed: bool | None = None  # the site failed again in the isolated hybrid replay
    log: list[str] = field(default_factory=list)


def _block(c: Captures, layer: int) -> str:
    return f"layers.{layer}" if layer < c.n_layers else f"mtp.{layer - c.n_layers}"


def active_bisect(c: Captures, noise: NoiseModel, transform_ops=None) -> ActiveBisect:
    """Name the first bad layer of the captured case (see the module docstring); `transform_ops` as in the runs."""
    n_blocks = c.n_layers + c.inputs.args().n_mtp_layers
    result = ActiveBisect(0, math.ceil(math.log2(max(2, n_blocks))) + 2)
    t0 = time.perf_counter()
    if c.forced is None:
        add_forced(c, transform_ops)
    result.replays += 1
    v: Verdict = judge(c, noise)
    result.log.append(f"replay 1: every site forced ({time.perf_counter() - t0:.1f}s): " + (v.location() or "pass"))
    if v.first is None:
        return result
    f = v.first
    result.layer, result.site, result.submodule, result.phase, result.where = (
        f.layer, f.path, f.submodule, f.phase, f.first_failure,
    )  # fmt: skip
    if f.layer is None:
        return result  # the model-level head: nothing upstream of it to hand over to the reference
    t0 = time.perf_counter()
    block = _block(c, f.layer)
    store = RowStore.from_dump(c.reference.dump, c.n_layers)
    hybrid = runs.engine_capture(
        c.inputs, c.targets, force=store, select=lambda sp: sp.path == f"{block}.streams_in",
        transform_ops=transform_ops, name=f"hybrid from {block}",
    )  # fmt: skip
    result.replays += 1
    again = judge_run(c.reference.dump, hybrid.dump, c.layout, c.n_layers, noise, golden=c.golden.dump if c.golden
                      else None)  # fmt: skip
    same = [r for r in again.results if r.path == f.path and r.field == f.field and not r.passed]
    result.confirmed = bool(same)
    result.log.append(
        f"replay 2: reference up to {block}, optimized from it ({time.perf_counter() - t0:.1f}s): "
        + (f"{f.path}:{f.field} fails again" if same else f"{f.path}:{f.field} passes in isolation")
    )
    return result
