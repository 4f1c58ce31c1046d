"""Precision after loading, for the two half-precision GPU paths (bf16, and fp16 on GPUs without bf16).

Checked on the CPU: the dtypes each part ends up in, that the float32 parts (EnCodec, the captioner's
mel front end, RoPE's frequencies) hold exactly their float32 values (no half-precision round trip on
the way), and that every stage still runs in that precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synth import music

from mtm_bot.core.audio import Audio
from mtm_bot.stages import captioner as C
from mtm_bot.stages.captioner import Segment
from mtm_bot.stages.generator import SAMPLE_RATE, Block, Generator, build_tiny_musicgen
from mtm_bot.stages.refiner import Refiner
from mtm_bot.stages.tiny import build_tiny_llm, build_tiny_tokenizer

CPU = torch.device("cpu")
HALF = [torch.bfloat16, torch.float16]


def _dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: t.dtype for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()}


def _check_musicgen(model, reference, dtype) -> None:
    """EnCodec float32 and bit-identical to the float32 weights; T5's `wo` float32 under fp16 only;
    everything else in `dtype`."""
    for name, tensor in reference.audio_encoder.state_dict().items():
        loaded = model.audio_encoder.state_dict()[name]
        if tensor.is_floating_point():
            assert loaded.dtype == torch.float32, name
        assert torch.equal(loaded, tensor), f"audio_encoder.{name} was rounded"
    for name, kind in _dtypes(model).items():
        if name.startswith("audio_encoder."):
            continue
        keep = dtype == torch.float16 and ".wo." in name
        assert kind == (torch.float32 if keep else dtype), name
    assert any(".wo." in name for name in _dtypes(model.text_encoder))  # the check above saw T5's wo


@pytest.mark.parametrize("dtype", HALF)
def test_musicgen_casts_only_what_runs_in_half_precision(dtype):
    generator = Generator.load("tiny", "facebook/musicgen-melody", CPU, 1, dtype=dtype)
    reference, _ = build_tiny_musicgen("melody")
    _check_musicgen(generator.model, reference, dtype)
    # The whole block path runs in that precision: T5 (with a float32 wo), chroma, decoder, EnCodec.
    clip = Audio(music(2.0, SAMPLE_RATE, seed=2), SAMPLE_RATE)
    track = generator.generate(clip, [Block(0, 0.0, 1.0, 0, 0.0, 1.0, "warm jazz")], seed=1).audio
    assert track.samples.dtype == np.float32 and len(track.samples) == SAMPLE_RATE
    assert np.isfinite(track.samples).all() and track.samples.std() > 1e-4


@pytest.mark.parametrize("dtype", HALF)
def test_musicgen_checkpoint_loads_in_float32_before_the_cast(tmp_path, dtype):
    model, tokenizer = build_tiny_musicgen("melody")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = Generator.load("full", str(tmp_path), CPU, 1, dtype=dtype)
    _check_musicgen(loaded.model, model, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_captioner_front_end_stays_exact_float32(dtype):
    captioner = C.Captioner.load("tiny", CPU, dtype=dtype)
    mel = captioner.model.audio_encoder.mel_encoder
    assert torch.equal(mel.spec_fn.window, torch.hann_window(C.N_FFT))
    assert torch.equal(mel.mel_scale.fb, C.mel_filters())
    for name, kind in _dtypes(captioner.model).items():
        assert kind == (torch.float32 if ".mel_encoder." in f".{name}" else dtype), name
    segments = captioner.caption(Audio(music(12.0, rate=16000, seed=4), 16000))
    assert [(s.start, s.end) for s in segments] == [(0.0, 10.0), (10.0, 12.0)]


@pytest.mark.parametrize("dtype", HALF)
def test_captioner_checkpoint_front_end_is_not_rounded(tmp_path, dtype):
    fp32 = C.Captioner.tiny(CPU, dtype=torch.float32)
    state = fp32.model.state_dict()
    # A filter bank with values half precision cannot hold, as a trained checkpoint's might be.
    state["audio_encoder.mel_encoder.mel_scale.fb"] = state["audio_encoder.mel_encoder.mel_scale.fb"] * (1 + 1e-6)
    torch.save({"state_dict": state}, tmp_path / "transfer.pth")
    loaded = C.Captioner.from_checkpoint(tmp_path / "transfer.pth", fp32.model.bart.config, fp32.tokenizer, CPU, dtype)
    assert torch.equal(
        loaded.model.audio_encoder.mel_encoder.mel_scale.fb, state["audio_encoder.mel_encoder.mel_scale.fb"]
    )
    assert loaded.model.bart.model.shared.weight.dtype == dtype


def _check_llm(model, dtype) -> None:
    for name, kind in _dtypes(model).items():
        assert kind == (torch.float32 if "rotary_emb" in name else dtype), name
    reference = build_tiny_llm(build_tiny_tokenizer())
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("dtype", HALF)
def test_llm_runs_in_half_precision_with_float32_rope(dtype):
    refiner = Refiner.load("tiny", "unused", CPU, dtype=dtype)
    _check_llm(refiner.model, dtype)
    refinement = refiner.refine([Segment(0.0, 10.0, "a piano melody")], "make it a jazz carol")
    assert len(refinement.segments) == 1


@pytest.mark.parametrize("dtype", HALF)
def test_llm_checkpoint_loads_in_half_precision_with_float32_rope(tmp_path, dtype):
    tokenizer = build_tiny_tokenizer()
    build_tiny_llm(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    refiner = Refiner.load("full", str(tmp_path), CPU, dtype=dtype)
    _check_llm(refiner.model, dtype)
