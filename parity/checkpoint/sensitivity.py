"""How much a legitimate change of schedule moves the reference's own logits: the noise floor parity must live with.

The official model has no chunked prefill: a prompt is prefilled whole, or prefilled up to some position and then
fed one decode at a time (spec §11). Both are correct, yet they round differently (other GEMM shapes, other cache
read paths), so the logits differ by "numerical noise". How far that noise travels through the network is a
property of the weights: a trained model is calm (cos ~0.9999), a random one can be chaotic. Parity tolerances
only mean something relative to this floor, so it is measured here, on the reference alone:

- the first split runs greedily and fixes the tokens; every run (that one included) is teacher-forced with them,
  so all runs see the same sequence and stay aligned step for step;
- every later split is compared with the first at every emitted step: logits cosine in float64 and greedy-token
  agreement.
"""

from collections.abc import Sequence

import torch

from parity.errors import ParityError


def _prefill_lens(split, prompts) -> list[int] | None:
    """One split -> per-prompt first-chunk lengths (None = whole prompts). An int k prefills min(k, len)."""
    if split is None:
        return None
    if isinstance(split, int):
        return [min(split, len(p)) for p in prompts]
    return [len(p) if k is None else min(int(k), len(p)) for k, p in zip(split, prompts, strict=True)]


def _label(split) -> str:
    return "whole" if split is None else str(split)


def reference_generations(ckpt, prompts, decode_steps, *, prefill_lens=None, forced=None, device="cpu", mtp=False,
                          overrides=None) -> list:  # fmt: skip
    """Each prompt alone through a fresh reference model (greedy, or teacher-forced with `forced`), prefilling
    `prefill_lens[i]` tokens (None: the whole prompt) and decoding the rest; `decode_steps`: one int or one each."""
    from parity.checkpoint.reader import build_model
    from parity.reference.generate import greedy_generate

    steps = list(decode_steps) if isinstance(decode_steps, list | tuple) else [decode_steps] * len(prompts)
    out = []
    for i, prompt in enumerate(prompts):
        model, _ = build_model(ckpt, device=device, overrides=overrides)
        out.append(
            greedy_generate(
                model,
                prompt,
                steps[i],
                mtp=mtp,
                prefill_len=None if prefill_lens is None else prefill_lens[i],
                forced=None if forced is None else forced[i],
            )  # fmt: skip
        )
    return out


def schedule_sensitivity(
    ckpt,
    prompts: Sequence[torch.Tensor],
    decode_steps,
    splits: Sequence = (None, 64),
    *,
    device="cpu",
    overrides=None,
) -> dict:
    """Run the reference on `prompts` once per split and compare each split's logits with the first split's.

    A split is None (prefill each prompt whole), an int k (prefill the first min(k, len) tokens, decode the rest
    of the prompt one token at a time) or a list with one such entry per prompt. `decode_steps` is one int or one
    per prompt; `overrides` (field name -> value) replace ModelArgs fields (as in `build_model`).

    Returns a dict: `min_cos` (float64 logits cosine, min over every compared split, prompt and step; exactly 1.0
    where the logits are bitwise equal), `token_agreement` (fraction of those steps whose greedy token equals the
    first split's), `tokens_equal`, `steps` (compared steps), `per_split` ({label: {min_cos, token_agreement}})
    and `per_prompt_min_cos`.
    """
    if len(splits) < 2:
        raise ParityError(f"schedule_sensitivity: needs at least two splits to compare, got {list(splits)}")
    run = dict(device=device, mtp=False, overrides=overrides)
    base = reference_generations(ckpt, prompts, decode_steps, prefill_lens=_prefill_lens(splits[0], prompts), **run)
    forced = [g.tokens for g in base]
    per_split, per_prompt = {}, [1.0] * len(prompts)
    all_cos, all_agree = [], []
    for split in splits[1:]:
        other = reference_generations(
            ckpt, prompts, decode_steps, prefill_lens=_prefill_lens(split, prompts), forced=forced, **run
        )
        cos_split, agree_split = [], []
        for i, (a, b) in enumerate(zip(base, other)):
            la, lb = torch.stack(a.logits).double(), torch.stack(b.logits).double()
            # bitwise-equal steps are exactly 1.0 (the float64 formula can land an ulp off); never above 1
            same = (la == lb).all(-1)
            cos = torch.nn.functional.cosine_similarity(la, lb, dim=-1).clamp(max=1.0).masked_fill(same, 1.0)
            agree = la.argmax(-1) == lb.argmax(-1)
            per_prompt[i] = min(per_prompt[i], cos.min().item())
            cos_split.append(cos)
            agree_split.append(agree)
        cos_split, agree_split = torch.cat(cos_split), torch.cat(agree_split)
        per_split[_label(split)] = {
            "min_cos": cos_split.min().item(),
            "token_agreement": agree_split.double().mean().item(),
        }
        all_cos.append(cos_split)
        all_agree.append(agree_split)
    cos, agree = torch.cat(all_cos), torch.cat(all_agree)
    return {
        "min_cos": cos.min().item(),
        "token_agreement": agree.double().mean().item(),
        "tokens_equal": bool(agree.all()),
        "steps": int(cos.numel()),
        "per_split": per_split,
        "per_prompt_min_cos": per_prompt,
    }
