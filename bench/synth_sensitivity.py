"""Schedule sensitivity of the synthetic inits: how far a legitimate prefill split moves the reference's logits.

    python bench/synth_sensitivity.py                                # tiny, chaotic and calm, seed 0, CPU
    python bench/synth_sensitivity.py --seeds 0 1 2 3 --splits 64 1   # more seeds, more schedules
    python bench/synth_sensitivity.py --preset flash-shaped --device cuda
    python bench/synth_sensitivity.py --bug                          # also: what a real decode bug does

Prompts are the built-in tiny case's (lengths 150, 37, 4, 131; 8 decode steps; prompt seed 0). Each split is
compared with the whole-prompt prefill (`parity.checkpoint.sensitivity.schedule_sensitivity`). Prints one JSON
line per (preset, init, seed).

`--bug` reruns the first split with a planted engine-style bug, every decode missing its own window slot (the
newest KV entry), teacher-forced like the others, and compares it with the clean whole-prompt run ("bug"): a
useful harness needs the bug to move the logits far more than the legitimate schedule change does.
"""

import argparse
import contextlib
import json
import platform
import tempfile
import time

import torch

from parity.checkpoint import write_checkpoint
from parity.checkpoint.sensitivity import reference_generations, schedule_sensitivity
from parity.checkpoint.synth import INITS
from parity.config import ModelArgs
from parity.reference import kernels

PROMPT_LENS = (150, 37, 4, 131)
DECODE_STEPS = 8


def preset_args(preset: str) -> ModelArgs:
    if preset == "tiny":
        return ModelArgs.tiny()
    # Flash widths (dim 4096, 64 heads x 512, q-LoRA 1024, o-LoRA 8 x 1024, indexer 64 x 128, expert 2048) with
    # 16 experts, a small vocabulary and two layers (CSA, HCA) plus MTP, as bench/gpu_checks.py's flash section
    return ModelArgs.flash(
        n_layers=2, n_hash_layers=1, n_routed_experts=16, vocab_size=16384, compress_ratios=(4, 128, 0)
    )


def case_prompts(vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    # the built-in cases draw their prompts like this (parity.cases.Case.prompts)
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, vocab_size, (n,), generator=g) for n in PROMPT_LENS]


@contextlib.contextmanager
def decode_misses_own_slot(window: int):
    """Patch the reference's sparse attention: a one-token call (a decode) drops its own window slot. The window
    list is oldest first, so the query's own slot is the last valid one of the first `window` entries."""
    sparse_attn = kernels.sparse_attn

    def buggy(q, kv, sink, idx, scale):
        if q.shape[1] == 1:
            idx = idx.clone()
            own = (idx[..., :window] >= 0).sum(-1, keepdim=True) - 1
            idx[..., :window].scatter_(-1, own, -1)
        return sparse_attn(q, kv, sink, idx, scale)

    kernels.sparse_attn = buggy
    try:
        yield
    finally:
        kernels.sparse_attn = sparse_attn


def bug_effect(ckpt, prompts, steps: int, split: int, window: int, device) -> dict:
    """Min logits cos and greedy agreement of the buggy split run against the clean whole-prompt run."""
    clean = reference_generations(ckpt, prompts, steps, device=device, mtp=False)
    forced = [g.tokens for g in clean]
    with decode_misses_own_slot(window):
        lens = [min(split, len(p)) for p in prompts]
        buggy = reference_generations(ckpt, prompts, steps, prefill_lens=lens, forced=forced, device=device, mtp=False)
    cos, agree = [], []
    for a, b in zip(clean, buggy):
        la, lb = torch.stack(a.logits).double(), torch.stack(b.logits).double()
        cos.append(torch.nn.functional.cosine_similarity(la, lb, dim=-1))
        agree.append(la.argmax(-1) == lb.argmax(-1))
    per_prompt = [c.min().item() for c in cos]
    cos, agree = torch.cat(cos), torch.cat(agree)
    return {"min_cos": cos.min().item(), "token_agreement": agree.double().mean().item(), "per_prompt": per_prompt}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=["tiny", "flash-shaped"], default="tiny")
    parser.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--splits", nargs="+", type=int, default=[64], help="first-chunk lengths vs whole prompt")
    parser.add_argument("--steps", type=int, default=DECODE_STEPS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bug", action="store_true", help="also run the first split with a planted decode bug")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    args = preset_args(opts.preset)
    prompts = case_prompts(args.vocab_size)
    device = opts.device
    where = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, device {device} ({where}), threads {torch.get_num_threads()}")
    for init in opts.inits:
        for seed in opts.seeds:
            with tempfile.TemporaryDirectory() as d:
                t0 = time.time()
                ckpt = write_checkpoint(d, args, seed=seed, init=init)
                written = time.time() - t0
                t0 = time.time()
                r = schedule_sensitivity(ckpt, prompts, opts.steps, splits=[None, *opts.splits], device=device)
                if opts.bug:
                    r["bug"] = bug_effect(ckpt, prompts, opts.steps, opts.splits[0], args.window_size, device)
            row = {"preset": opts.preset, "init": init, "seed": seed, **r, "write_s": round(written, 1)}
            row["run_s"] = round(time.time() - t0, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
