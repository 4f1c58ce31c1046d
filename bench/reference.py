"""The reference path: MusicGen codes from transformers' own `generate`, for the decode tests and benchmarks.

`generate` returns audio, not codes: it ends by decoding the codes with EnCodec. `reference_codes`
swaps `audio_encoder.decode` for a recorder during the call, so it returns the exact codes that
`generate` produced and the benchmark does not time EnCodec (the fast path does not decode either).
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import torch


@contextmanager
def _recording_codes(model):
    recorded: list[torch.Tensor] = []

    def record(audio_codes, audio_scales=None, **_):
        recorded.append(audio_codes)
        return SimpleNamespace(audio_values=torch.zeros(audio_codes.shape[1], 1, 1))

    model.audio_encoder.decode = record  # instance attribute shadows the class method
    try:
        yield recorded
    finally:
        del model.audio_encoder.decode


@torch.no_grad()
def reference_codes(
    model,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    input_features: torch.Tensor | None = None,
    prompt_codes: torch.Tensor | None = None,
    new_frames: int,
    guidance_scale: float = 3.0,
    greedy: bool = True,
    top_k: int = 250,
) -> torch.LongTensor:
    """Codes (B, K, P + new_frames) from `model.generate`, prompt included, delay pattern undone.

    The audio prompt goes in as `decoder_input_ids` (B * K, P): `generate` prepends the start token
    and lays the prompt out in the delay pattern itself, forcing the prompt's delayed tail. Sampling
    draws from torch's global generator. A stereo model's codes come back interleaved (L0 R0 L1 R1 ...),
    as it generates them; `generate` hands EnCodec the left and the right codebooks one after the other.
    """
    channels = model.decoder.config.audio_channels
    delays = model.decoder.num_codebooks // channels
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        guidance_scale=guidance_scale,
        do_sample=not greedy,
        # the last codebooks run delays - 1 steps behind the first
        max_new_tokens=new_frames + delays - 1,
    )
    if not greedy:
        kwargs["top_k"] = top_k
    if input_features is not None:
        kwargs["input_features"] = input_features
    if prompt_codes is not None:
        kwargs["decoder_input_ids"] = prompt_codes.reshape(-1, prompt_codes.shape[-1])
    with _recording_codes(model) as recorded:
        model.generate(**kwargs)
    if channels == 1:
        (codes,) = recorded  # (1, B, K, frames)
        return codes[0]
    left, right = recorded  # (1, B, K / 2, frames) each
    return torch.stack([left[0], right[0]], dim=2).flatten(1, 2)
