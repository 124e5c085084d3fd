"""The text of a standalone `repro_<op>.py`: reload one saved op call, run it with the chosen implementation and
with its reference twin, print the metrics and PASS / FAIL (exit 1 on FAIL, 2 on a bad file or option).

The script needs only the `parity` package (the kernels it runs live there) and its two sibling files; it is kept
short and explicit so a kernel engineer can edit it (swap the candidate, print more) without reading the harness.
"""

TEMPLATE = '''#!/usr/bin/env python3
"""Kernel repro of the `{op}` op, extracted by parity from a failed run (see {stem}.json: call site, verdict,
threshold). Reruns the saved call with the implementation that ran (or `--backend NAME` from the registry) and
with the op's reference twin, prints the metrics, exits 1 when they differ beyond the threshold.

    python {stem}.py                  # what ran in the run (planted bug included)
    python {stem}.py --backend torch  # another registered backend, e.g. the fixed one
"""

import argparse
import sys
from pathlib import Path

from parity.errors import ParityError
from parity.repro import replay

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", help="run this registered backend instead of what ran in the run")
    parser.add_argument("--device", help="cpu or cuda (default: the run's device, cpu when it has no GPU)")
    opts = parser.parse_args()
    try:
        meta, args, kwargs, run_output = replay.load(HERE / "{stem}.json", opts.device)
        fn, name = replay.candidate(meta, opts.backend)
        threshold = replay.threshold_for(meta, opts.backend)
        # the run's output is only comparable when the same implementation runs again
        same = run_output if opts.backend is None else None
        result = replay.run_call(meta["op"], fn, args, kwargs, threshold, name, same)
    except ParityError as e:
        print(f"error: {{e}}", file=sys.stderr)
        return 2
    print(f"site      {{meta['call_site']['site']}} step {{meta['call_site']['step']}}, "
          f"request {{meta['call_site']['request']}}, position {{meta['call_site']['position']}}")
    print(replay.render(result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
'''


def script_text(op: str, stem: str) -> str:
    return TEMPLATE.format(op=op, stem=stem)
