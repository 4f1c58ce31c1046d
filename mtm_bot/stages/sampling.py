"""Classifier-free guidance and the choice of MusicGen's next tokens, as transformers' `generate` makes it
(guidance scale 3, top-k 250, optional top-p and temperature), on the device with no host sync."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    guidance_scale: float = 3.0  # classifier-free guidance; <= 1 turns it off (no null rows)
    top_k: int = 250  # 0 = no top-k filter
    top_p: float = 0.0  # 0 = no nucleus filter
    temperature: float = 1.0
    greedy: bool = False  # argmax instead of sampling (used by the equivalence tests)

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.top_k < 0 or not 0 <= self.top_p <= 1:
            raise ValueError(f"invalid sampling settings: {self}")

    @property
    def guided(self) -> bool:
        """Whether every block has a null-conditioned row beside its conditional one."""
        return self.guidance_scale > 1


def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(2R, K, V) logits in (conditional, null) row pairs -> (R, K, V): null + scale * (conditional - null)."""
    cond, uncond = logits.view(-1, 2, *logits.shape[1:]).unbind(1)
    return uncond + (cond - uncond) * scale


def choose(logits: torch.Tensor, sampling: Sampling, noise: torch.Tensor | None) -> torch.Tensor:
    """The next token per row and codebook, (R, K): the argmax, or a sample drawn with `noise`, (R, K, V)
    exponential noise from each block's own generator."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    if noise is None:
        raise ValueError("sampling needs noise")
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < sampling.top_p < 1:
        logits = top_p_filter(logits, sampling.top_p)
    # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race), without the host sync of
    # torch.multinomial: gpt-fast's multinomial_sample_one_no_sync.
    return (logits.softmax(dim=-1) / noise).argmax(dim=-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (always the top one): the rule
    of transformers' TopPLogitsWarper."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already suffices
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
