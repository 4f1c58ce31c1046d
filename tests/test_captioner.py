"""The LP-MusicCaps-compatible captioner: front end, checkpoint layout, segmenting, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synth import music

from mtm_bot.core.audio import Audio
from mtm_bot.core.errors import Cancelled, ClipTooShort, ModelUnavailable
from mtm_bot.core.progress import CancelToken
from mtm_bot.stages import captioner as C

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny() -> C.Captioner:
    return C.Captioner.load("tiny", CPU)


# ---------------------------------------------------------------------------------------------------------
# Front end


def reference_log_mel(x: np.ndarray) -> np.ndarray:
    """The reference's definition written out in numpy: reflect-padded STFT, Hann 1024, hop 160, power =
    (real part)^2, 128 HTK mel triangles over 0-8000 Hz without normalisation, 10*log10(max(x, 1e-10))."""
    n_fft, hop = 1024, 160
    padded = np.pad(x, n_fft // 2, mode="reflect")
    frames = np.stack([padded[i : i + n_fft] for i in range(0, len(padded) - n_fft + 1, hop)])
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann
    bins = np.arange(n_fft // 2 + 1)
    real = (frames * window) @ np.cos(2 * np.pi * np.outer(n, bins) / n_fft)
    power = real**2

    def mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(0.0), mel(8000.0), 128 + 2))
    freqs = np.linspace(0.0, 8000.0, n_fft // 2 + 1)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    filters = np.maximum(0.0, np.minimum((freqs - left) / (centre - left), (right - freqs) / (right - centre)))
    return 10.0 * np.log10(np.maximum(filters @ power.T, 1e-10))  # (128, frames)


def test_front_end_matches_the_reference_definition():
    x = music(10.0, rate=16000, seed=2).astype(np.float64)
    expected = reference_log_mel(x)
    assert expected.shape == (128, 1001)

    # The definition, evaluated in float64: equal to the written-out formula.
    got64 = C.log_mel_spectrogram(
        torch.from_numpy(x)[None], torch.hann_window(1024, dtype=torch.float64), C.mel_filters(torch.float64)
    )
    assert got64.shape == (1, 128, 1001)
    np.testing.assert_allclose(got64[0].numpy(), expected, atol=1e-4, rtol=0)

    # The module the model runs (float32, with its own window and filter buffers): float32 rounding only
    # shows in near-silent cells, so compare the cells within 60 dB of the loudest.
    got32 = C.MelEncoder()(torch.from_numpy(x).float()[None])[0].numpy()
    audible = expected > expected.max() - 60.0
    assert audible.mean() > 0.3
    np.testing.assert_allclose(got32[audible], expected[audible], atol=1e-3, rtol=0)


def test_positional_table_is_the_reference_sinusoids():
    # modules.py `sinusoids(n_ctx, text_dim)`: timescales 10000^(-i / (channels/2 - 1)), sin then cos.
    channels = 768
    inv = np.exp(-np.log(10_000.0) / (channels // 2 - 1) * np.arange(channels // 2))
    angle = np.arange(32)[:, None] * inv[None, :]
    expected = np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
    np.testing.assert_allclose(C.sinusoids(32, channels).numpy(), expected, atol=1e-5)
    assert C.N_CTX == 32


def test_real_part_power_is_not_magnitude_power():
    # Guard the deliberate quirk: |X|^2 would give a different (larger) spectrum.
    x = torch.from_numpy(music(10.0, rate=16000, seed=3))[None]
    window, filters = torch.hann_window(1024), C.mel_filters()
    spec = torch.stft(x, 1024, 160, 1024, window, center=True, pad_mode="reflect", return_complex=True)
    magnitude_db = 10 * torch.log10((spec.abs().square().transpose(1, 2) @ filters).clamp(min=1e-10))
    ours = C.log_mel_spectrogram(x, window, filters).transpose(1, 2)
    assert (magnitude_db - ours).mean() > 1.0  # re^2 averages half the power: about 3 dB lower


# ---------------------------------------------------------------------------------------------------------
# Checkpoint layout


BART_BASE = C.bart_base_config()


def expected_manifest() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of `transfer.pth`'s state_dict, from reading lpmc/music_captioning/model/bart.py and
    modules.py (BartCaptionModel: `audio_encoder` with torchaudio buffers, `bart` = bart-base)."""
    d, ffn, vocab = 768, 3072, 50265
    keys = {
        "audio_encoder.mel_encoder.spec_fn.window": (1024,),
        "audio_encoder.mel_encoder.mel_scale.fb": (513, 128),
        "audio_encoder.conv1.weight": (d, 128, 3),
        "audio_encoder.conv1.bias": (d,),
        "audio_encoder.positional_embedding": (32, d),
        "bart.final_logits_bias": (1, vocab),
        "bart.model.shared.weight": (vocab, d),
        "bart.lm_head.weight": (vocab, d),
    }
    for i in range(5):
        keys[f"audio_encoder.conv_stack.{i}.weight"] = (d, d, 3)
        keys[f"audio_encoder.conv_stack.{i}.bias"] = (d,)

    def attention(prefix: str) -> None:
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            keys[f"{prefix}.{proj}.weight"] = (d, d)
            keys[f"{prefix}.{proj}.bias"] = (d,)

    def norm(prefix: str) -> None:
        keys[f"{prefix}.weight"] = (d,)
        keys[f"{prefix}.bias"] = (d,)

    for stack in ("encoder", "decoder"):
        base = f"bart.model.{stack}"
        keys[f"{base}.embed_tokens.weight"] = (vocab, d)
        keys[f"{base}.embed_positions.weight"] = (1024 + 2, d)
        norm(f"{base}.layernorm_embedding")
        for i in range(6):
            layer = f"{base}.layers.{i}"
            attention(f"{layer}.self_attn")
            norm(f"{layer}.self_attn_layer_norm")
            if stack == "decoder":
                attention(f"{layer}.encoder_attn")
                norm(f"{layer}.encoder_attn_layer_norm")
            keys[f"{layer}.fc1.weight"] = (ffn, d)
            keys[f"{layer}.fc1.bias"] = (ffn,)
            keys[f"{layer}.fc2.weight"] = (d, ffn)
            keys[f"{layer}.fc2.bias"] = (d,)
            norm(f"{layer}.final_layer_norm")
    return keys


def test_full_size_model_has_the_reference_checkpoint_layout():
    with torch.device("meta"):
        model = C.LPMusicCaps(BART_BASE)
    manifest = expected_manifest()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == manifest

    checkpoint = {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}
    model.load_state_dict(checkpoint, strict=True, assign=True)

    missing = dict(checkpoint)
    del missing["audio_encoder.positional_embedding"]
    with pytest.raises(RuntimeError, match="Missing key.*audio_encoder.positional_embedding"):
        model.load_state_dict(missing, strict=True, assign=True)
    extra = dict(checkpoint, **{"module.audio_encoder.proj.weight": torch.empty(768, 768, device="meta")})
    with pytest.raises(RuntimeError, match="Unexpected key.*module.audio_encoder.proj.weight"):
        model.load_state_dict(extra, strict=True, assign=True)


def test_checkpoint_in_the_reference_format_loads_every_weight(tiny, tmp_path):
    clip = Audio(music(12.0, rate=16000, seed=4), 16000)
    path = tmp_path / "transfer.pth"
    # Like the reference's file: epoch, state_dict and the optimizer's state.
    torch.save(
        {
            "epoch": 99,
            "state_dict": tiny.model.state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]},
        },
        path,
    )

    # A fresh model starts from other random weights: equal captions mean everything came from the file.
    loaded = C.Captioner.from_checkpoint(path, tiny.model.bart.config, tiny.tokenizer, CPU)
    assert loaded.caption(clip) == tiny.caption(clip)

    state = dict(tiny.model.state_dict())
    del state["audio_encoder.mel_encoder.mel_scale.fb"]
    torch.save({"epoch": 99, "state_dict": state}, path)
    with pytest.raises(RuntimeError, match="mel_scale.fb"):
        C.Captioner.from_checkpoint(path, tiny.model.bart.config, tiny.tokenizer, CPU)


# ---------------------------------------------------------------------------------------------------------
# Segmenting


@pytest.mark.parametrize(
    "seconds, bounds",
    [
        (25.0, [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]),
        (30.0, [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]),
        (20.5, [(0.0, 10.0), (10.0, 20.0)]),  # a trailing half second is dropped
        (3.0, [(0.0, 3.0)]),  # a clip shorter than a segment still gets its caption
        (1.0, [(0.0, 1.0)]),
    ],
)
def test_split_segments(seconds, bounds):
    samples = music(seconds, rate=16000)
    waves, got = C.split_segments(samples, seconds)
    assert got == bounds
    assert waves.shape == (len(bounds), 160_000)
    flat = waves.reshape(-1).numpy()
    kept = min(len(samples), len(bounds) * 160_000)
    np.testing.assert_array_equal(flat[:kept], samples[:kept])
    assert not flat[kept:].any()  # zero padding


def test_segment_count_follows_the_true_duration_not_resampling_rounding():
    # 11 s whose resampled samples came out one short: still two segments, the second ending at 11 s.
    waves, bounds = C.split_segments(music(11.0, rate=16000)[:-1], 11.0)
    assert bounds == [(0.0, 10.0), (10.0, 11.0)] and waves.shape == (2, 160_000)


def test_clip_under_one_second_is_refused_with_a_friendly_error(tiny):
    with pytest.raises(ClipTooShort, match=r"0\.5 s long.*at least 1 s"):
        tiny.caption(Audio(music(0.5, rate=44100), 44100))


# ---------------------------------------------------------------------------------------------------------
# Captioning


def test_tiny_captions_every_segment_in_one_batch(tiny):
    # 25 s at 44.1 kHz: music, then quiet noise, then a different piece for the last 5 s.
    rate = 44100
    noise = 0.05 * np.random.default_rng(0).standard_normal(10 * rate).astype(np.float32)
    clip = Audio(np.concatenate([music(10.0, rate, seed=1), noise, music(5.0, rate, seed=7)]), rate)

    calls: dict[str, list[int]] = {"audio": [], "encoder": [], "decoder": []}

    def batch_size(out) -> int:
        return (out if isinstance(out, torch.Tensor) else out.last_hidden_state).shape[0]

    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: calls[name].append(batch_size(out)))
        for name, module in (
            ("audio", tiny.model.audio_encoder),
            ("encoder", tiny.model.bart.model.encoder),
            ("decoder", tiny.model.bart.model.decoder),
        )
    ]
    try:
        segments = tiny.caption(clip)
    finally:
        for hook in hooks:
            hook.remove()

    assert [(s.start, s.end) for s in segments] == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert all(isinstance(s.caption, str) and s.caption.strip() for s in segments)
    assert calls["audio"] == [3] and calls["encoder"] == [3]  # one pass for all segments
    assert calls["decoder"] and set(calls["decoder"]) == {3 * C.NUM_BEAMS}  # every beam-search step batched
    assert len(calls["decoder"]) <= C.MAX_TOKENS
    assert len({s.caption for s in segments}) == 3  # the audio steers the text


def test_captions_are_deterministic(tiny):
    clip = Audio(music(10.0, rate=32000, seed=5), 32000)
    assert tiny.caption(clip) == C.Captioner.load("tiny", CPU).caption(clip)


def test_cancel_stops_at_the_next_decode_step(tiny):
    clip = Audio(music(10.0, rate=16000), 16000)
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        tiny.caption(clip, cancel=cancel)

    cancel = CancelToken()
    steps = []

    def cancel_after_three(module, args, out):
        steps.append(1)
        if len(steps) == 3:
            cancel.cancel()

    hook = tiny.model.bart.model.decoder.register_forward_hook(cancel_after_three)
    try:
        with pytest.raises(Cancelled):
            tiny.caption(clip, cancel=cancel)
    finally:
        hook.remove()
    assert len(steps) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_the_model_in_half_precision():
    captioner = C.Captioner.load("tiny", torch.device("cuda"))
    assert captioner.model.bart.model.shared.weight.dtype in (torch.float16, torch.bfloat16)
    assert captioner.model.audio_encoder.mel_encoder.mel_scale.fb.dtype == torch.float32
    segments = captioner.caption(Audio(music(15.0, rate=32000), 32000))
    assert len(segments) == 2 and all(s.caption for s in segments)


def test_full_profile_without_weights_names_the_repo_and_the_download_command(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable) as err:
        C.Captioner.load("full", CPU)
    assert "seungheondoh/lp-music-caps" in str(err.value)
    assert "python -m mtm_bot download" in str(err.value)
