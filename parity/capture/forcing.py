"""Teacher forcing: forward hooks on a model's taps that replace its values with another run's at the same
(request, position), so what follows a tap starts from the other run's values.

Forcing every site of the optimized model with the reference's makes each segment between two taps compute from
the reference's inputs: what it then produces differs from the reference only by that segment's own error (its
cache and state included, since they are built from forced inputs too), never by error inherited from upstream.
Forcing one block's output gives a hybrid run: the reference up to that block, the optimized model after it
(active bisect). Discrete decisions (expert ids, indexer top-k) are forced like any value; what the model chose
itself is recorded first (install the dump before the forcing: hooks run in registration order).

Rows the source run has no value for (a speculative token the engine rejected, a row outside the source's
schedule) keep the model's own values and are counted in `missed`.
"""

from collections import Counter
from collections.abc import Callable

from torch import nn

from parity.compare import sites
from parity.compare.rows import RowStore, keys_of
from parity.dump import current_tags


class Forcing:
    """Hooks on every tap of `model` that `select` picks, replacing its rows with `store`'s."""

    def __init__(self, model: nn.Module, store: RowStore, select: Callable[[sites.SitePath], bool], n_layers: int):
        self.store = store
        self.forced: Counter = Counter()  # site path -> rows replaced
        self.missed: Counter = Counter()  # site path -> rows the store had no value for
        self.handles = []
        for path, module in model.named_modules():
            sp = sites.parse(path, n_layers)
            if sp is not None and select(sp):
                self.handles.append(module.register_forward_hook(self._hook(path, sp)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "Forcing":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _hook(self, path: str, sp: sites.SitePath):
        def hook(module, args, out):
            tags = current_tags()
            if tags.extra.get("speculative"):
                return None  # chained MTP drafts past the committed positions: thrown away anyway
            values = list(out) if isinstance(out, tuple) else [out]
            rows = values.pop() if sp.site.rows_field is not None else None
            keys = keys_of(tags, values[0].shape[0], rows)
            fields = ["out"] if len(values) == 1 and rows is None else [f"out.{i}" for i in range(len(values))]
            replaced = []
            for field, v in zip(fields, values):
                new, found = self.store.gather(path, field, keys, v)
                replaced.append(new)
            n_found = int(found.sum())
            self.forced[path] += n_found
            self.missed[path] += sum(k is not None for k in keys) - n_found
            if rows is not None:
                replaced.append(rows)
            return tuple(replaced) if isinstance(out, tuple) else replaced[0]

        return hook


def everything(sp: sites.SitePath) -> bool:
    """All sites but the logits (nothing in the model reads them back; forcing them would hide the head)."""
    return sp.site.kind != "logits"


def block_output(block: str) -> Callable[[sites.SitePath], bool]:
    """Only the output streams of `block` (`layers.3`): the reference up to it, the model after it."""
    return lambda sp: sp.block == block and sp.site.name == "hc_post_ffn"
