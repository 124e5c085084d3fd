"""Record the op calls that compute a failing site, during a teacher-forced engine run.

The verdict names a site (`layers.0.attn.o_lora`), a step and a (request, position). In the forced run every tap
holds the reference's value, so the site's own error comes from the op calls made inside its block since the block
started at that step; the op that computes the site is among them (the calls right before the site's tap fires).
`OpRecorder` wraps every op of the resolved `Ops` table (the registry's output, after any planted bug) and keeps a
copy of each call's inputs, its output and the last tap that fired before it, but only:

- inside the failing block (`OptBlock` / `OptMTPBlock` by `layer_id`, the verdict's layer index),
- in the forward whose dump tags are the failing step and contain the failing (request, position) row (an engine
  step may run a block more than once: a replay after a rejected draft, chained MTP drafts),
- until the failing site's tap fires, and within `max_bytes` of copied tensors.

Blocks and taps are found with torch's global module hooks (the engine builds its model internally); the hooks are
removed when the recording ends.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from parity.compare.rows import token_keys
from parity.dump import current_tags
from parity.optimized.model import OptBlock, OptMTPBlock
from parity.optimized.ops import OP_MODULES, Ops
from parity.repro import codec
from parity.taps import Tap


@dataclass(frozen=True)
class Target:
    """Where the verdict put the first failure: the tap path, the block's layer index, the step and row."""

    site: str  # tap path, e.g. layers.0.attn.o_lora
    layer: int  # block index in execution order (MTP blocks after the main layers)
    block: str  # layers.0 / mtp.0
    step: int
    request: str
    position: int


@dataclass
class OpCall:
    op: str
    index: int  # order of the call inside the recorded block forward
    after_tap: str  # the last tap of the block that fired before the call ("" = the block's start)
    fn: Callable
    args: tuple
    kwargs: dict
    output: object  # what the op returned in the run (a copy)


@dataclass
class OpRecorder:
    target: Target
    max_bytes: int = 1 << 30
    calls: list[OpCall] = field(default_factory=list)
    site_fired: bool = False  # the failing tap fired in the recorded forward
    segment_start: str = ""  # the last tap before the failing one: the failing site's own segment starts here
    dropped: list[str] = field(default_factory=list)  # calls not recorded (over max_bytes)
    _active: bool = False
    _last_tap: str = ""
    _taps: dict[int, str] = field(default_factory=dict)
    _bytes: int = 0
    _handles: list = field(default_factory=list)

    def wrap(self, ops: Ops) -> Ops:
        """The same ops, each recording its calls while the recorder is active."""
        return replace(ops, **{name: self._wrapped(name, getattr(ops, name)) for name in OP_MODULES})

    def _wrapped(self, name: str, fn: Callable) -> Callable:
        def op(*args, **kwargs):
            if not self._active:
                return fn(*args, **kwargs)
            size = codec.nbytes(args) + codec.nbytes(tuple(kwargs.values()))
            if self._bytes + size > self.max_bytes:
                self.dropped.append(f"{name} (call {len(self.calls) + len(self.dropped)}, {size} bytes)")
                return fn(*args, **kwargs)
            self._bytes += size
            saved_args, saved_kwargs = codec.clone(args), codec.clone(kwargs)  # before an in-place op runs
            out = fn(*args, **kwargs)
            index = len(self.calls) + len(self.dropped)
            self.calls.append(OpCall(name, index, self._last_tap, fn, saved_args, saved_kwargs, codec.clone(out)))
            return out

        op.__wrapped__ = fn
        return op

    # --- module hooks -----------------------------------------------------------------------------------------

    def _is_target_block(self, module: nn.Module) -> bool:
        if not isinstance(module, OptBlock | OptMTPBlock) or module.layer_id != self.target.layer:
            return False
        tags = current_tags()
        if tags.step != self.target.step or tags.cu_seqlens is None:
            return False
        want = (self.target.request, self.target.position)
        return any(k is not None and (str(k[0]), k[1]) == want for k in token_keys(tags))

    def _pre_hook(self, module: nn.Module, args) -> None:
        if self.site_fired or not self._is_target_block(module):
            return
        if not self._taps:
            self._taps = {id(m): f"{self.target.block}.{n}" for n, m in module.named_modules() if isinstance(m, Tap)}
        self.calls, self.dropped, self._bytes = [], [], 0  # a block run again in the step: the later run counts
        self._active, self._last_tap = True, ""

    def _post_hook(self, module: nn.Module, args, out) -> None:
        if isinstance(module, Tap) and self._active:
            path = self._taps.get(id(module))
            if path == self.target.site:
                self.site_fired, self._active, self.segment_start = True, False, self._last_tap
            elif path is not None:
                self._last_tap = path
        elif self._active and isinstance(module, OptBlock | OptMTPBlock) and module.layer_id == self.target.layer:
            self._active = False

    def __enter__(self) -> "OpRecorder":
        g = torch.nn.modules.module
        self._handles = [
            g.register_module_forward_pre_hook(self._pre_hook),
            g.register_module_forward_hook(self._post_hook),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._active = False

    def segment(self) -> list[OpCall]:
        """The calls between the tap before the failing site and the site's tap: what computes the site."""
        return [c for c in self.calls if c.after_tap == self.segment_start]
