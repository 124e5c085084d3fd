"""Capture for `parity run`: the taps attached to the frozen reference (`reference`), the hooks that replace a
model's values at its taps with another run's (`forcing`), and the runs themselves (`runs`). Records go through
`parity.dump`; rows, sites and judging are in `parity.compare` (`rows`, `sites`, `verdict`)."""
