"""Taps: named points of a model's computation where a harness can read values and replace them.

A `Tap` is an identity module: `x = self.tap(x)` returns its argument(s) unchanged, so a model with taps computes
exactly what it computes without them. Being a module, a tap is found by its path (`layers.2.hc_pre_attn`) and
carries the usual forward hooks: `parity.dump` records what passes through it, and teacher forcing replaces it
(a forward hook that returns other values). With no hook installed a tap costs one Python call.

The optimized model calls its taps inline; the reference model, which is frozen, gets the same taps attached from
outside at the same points (`parity.capture.reference`), so both sides produce records of the same names.

Conventions for what a tap passes: the leading dim of every tensor is the forward's token rows (flat `[T, ...]` in
the optimized model, `[1, s, ...]` in the reference), except for taps whose last argument is `rows`: an int64
tensor of token-row indices, one per leading row of the other tensors (compressor entries, logits).
"""

from torch import nn


class Tap(nn.Module):
    """An identity over one or more values; hooks read and replace them here."""

    def forward(self, *values):
        return values[0] if len(values) == 1 else values
