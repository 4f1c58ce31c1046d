"""The MusicGen generator: block plan, chroma, seamless joins, and block-by-block generation (tiny model)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mtm_bot.core.audio import Audio, resample, true_peak_dbfs
from mtm_bot.core.errors import Cancelled
from mtm_bot.core.progress import CancelToken
from mtm_bot.stages.generator import (
    CHROMA_LENGTH,
    CROSSFADE_SECONDS,
    EDGE_SECONDS,
    SAMPLE_RATE,
    Block,
    Generator,
    Rendered,
    crossfade,
    melody_chroma,
    plan_blocks,
)
from mtm_bot.stages.melody import has_bass_line, remove_bass
from mtm_bot.stages.pipeline import BLOCK_SECONDS
from tests.synth import music

SEGMENTS_2 = [(0.0, 10.0), (10.0, 15.0)]


# --- block plan ---------------------------------------------------------------------------------


def test_plan_cycles_segments_when_output_outlasts_clip():
    blocks = plan_blocks(45, SEGMENTS_2, 10)
    assert [(b.start, b.end) for b in blocks] == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 45)]
    assert [b.segment for b in blocks] == [0, 1, 0, 1, 0]
    assert [(b.melody_start, b.melody_end) for b in blocks[:2]] == SEGMENTS_2
    assert [b.index for b in blocks] == list(range(5))


def test_an_extension_plans_on_from_the_end_and_keeps_cycling():
    blocks = plan_blocks(55, SEGMENTS_2, 10, start=25, first_index=3)
    assert [(b.start, b.end) for b in blocks] == [(25, 35), (35, 45), (45, 55)]
    assert [b.segment for b in blocks] == [1, 0, 1]  # the 25 s track's blocks followed segments 0, 1, 0
    assert [b.index for b in blocks] == [3, 4, 5]


def test_plan_exact_multiple_has_no_empty_block():
    assert len(plan_blocks(30, [(0.0, 10.0)], 10)) == 3
    assert len(plan_blocks(30.5, [(0.0, 10.0)], 10)) == 4


# --- chroma ------------------------------------------------------------------------------------


def _reference_chroma(wave: np.ndarray) -> np.ndarray:
    """The feature extractor's definition written out directly in numpy (framewise rFFT)."""
    from transformers.audio_utils import chroma_filter_bank

    n_fft, hop = 16384, 4096
    wave = wave[: 30 * SAMPLE_RATE].astype(np.float64)
    padded = np.pad(wave, n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack([padded[i : i + n_fft] for i in range(0, len(padded) - n_fft + 1, hop)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2 / np.sum(window**2)
    chroma = power @ chroma_filter_bank(n_fft, 12, SAMPLE_RATE, tuning=0).T  # (frames, 12)
    one_hot = np.eye(12)[chroma.argmax(axis=1)]
    return np.tile(one_hot, (-(-CHROMA_LENGTH // len(one_hot)), 1))[:CHROMA_LENGTH]


def test_chroma_matches_the_reference_definition():
    wave = music(10.0, SAMPLE_RATE, seed=3)
    ours = melody_chroma(wave, filter_bass=False).numpy()
    assert ours.shape == (CHROMA_LENGTH, 12)
    np.testing.assert_array_equal(ours, _reference_chroma(wave))
    # What the model is conditioned on: the same definition, after the bass is filtered out where there is one.
    conditioned = remove_bass(wave, SAMPLE_RATE) if has_bass_line(wave, SAMPLE_RATE) else wave
    np.testing.assert_array_equal(melody_chroma(wave).numpy(), _reference_chroma(conditioned))
    # 10 s is 79 STFT frames; the model sees them tiled to 30 s.
    np.testing.assert_array_equal(ours[79:158], ours[:79])


def test_chroma_of_a_tone_is_its_pitch_class():
    t = np.arange(5 * SAMPLE_RATE) / SAMPLE_RATE
    a440 = melody_chroma(0.5 * np.sin(2 * np.pi * 440 * t)).numpy()
    c523 = melody_chroma(0.5 * np.sin(2 * np.pi * 523.25 * t)).numpy()
    assert (a440.argmax(1) == 9).all()  # C C# D D# E F F# G G# A: A is 9
    assert (c523.argmax(1) == 0).all()
    assert (a440.sum(1) == 1).all()


# --- joins -------------------------------------------------------------------------------------


def test_crossfade_passes_identical_material_through_unchanged():
    wave = music(1.0, SAMPLE_RATE)
    joined = crossfade(wave[:20000], wave[20000 - 1600 :], 1600)
    np.testing.assert_allclose(joined, wave, atol=1e-6)


def test_crossfade_of_two_levels_has_no_step():
    overlap = 1600
    joined = crossfade(np.full(8000, 0.5, np.float32), np.full(8000, -0.5, np.float32), overlap)
    assert len(joined) == 8000 + 8000 - overlap
    assert joined[0] == 0.5 and joined[-1] == -0.5
    # A hard cut would jump by 1.0; the fade spreads it over 50 ms.
    assert np.abs(np.diff(joined)).max() < 3 / overlap


def test_crossfade_of_sines_has_no_click_and_gains_sum_to_one():
    overlap = 1600
    t = np.arange(16000) / SAMPLE_RATE
    head = np.sin(2 * np.pi * 220 * t).astype(np.float32)
    tail = np.sin(2 * np.pi * 330 * t + 1.0).astype(np.float32)  # unrelated phase
    joined = crossfade(head, tail, overlap)
    steepest_sine_step = 2 * np.pi * 330 / SAMPLE_RATE
    hard_cut = np.concatenate([head[:-overlap], tail[overlap:]])
    assert np.abs(np.diff(hard_cut)).max() > 5 * steepest_sine_step  # the click a plain join makes
    assert np.abs(np.diff(joined)).max() < 1.2 * steepest_sine_step
    gains_out = crossfade(np.ones(overlap), np.zeros(overlap), overlap)
    gains_in = crossfade(np.zeros(overlap), np.ones(overlap), overlap)
    np.testing.assert_allclose(gains_out + gains_in, 1.0, atol=1e-12)
    assert np.all(np.diff(gains_in) > 0)


# --- generation (tiny MusicGen-melody, random weights) --------------------------------------------


@pytest.fixture(scope="module")
def generator():
    return Generator.load("tiny", "facebook/musicgen-melody", torch.device("cpu"), BLOCK_SECONDS)


@pytest.fixture(scope="module")
def clip():
    return Audio(music(15.0, 44100, seed=1), 44100)


class Recorder:
    """Wraps the decoder to keep every block's prompt and codes."""

    def __init__(self, decoder):
        self.decoder, self.calls = decoder, []

    def decode_blocks(self, blocks, *args, admit=None, **kwargs):
        def recorded(request, done):
            def record(codes):
                self.calls.append(({f.name: getattr(request, f.name) for f in dataclasses.fields(request)}, codes))
                done(codes)

            return request, record

        newcomers = None if admit is None else (lambda idle: [recorded(*block) for block in admit(idle)])
        return self.decoder.decode_blocks([recorded(*block) for block in blocks], *args, admit=newcomers, **kwargs)


def _blocks(duration, block_seconds, segments=SEGMENTS_2, caption="warm jazz carol with sleigh bells"):
    return [
        dataclasses.replace(b, description=f"{caption} {b.segment}")
        for b in plan_blocks(duration, segments, block_seconds)
    ]


def test_same_seed_same_track_other_seed_other_track(generator, clip):
    blocks = _blocks(2, 1)  # a melody-conditioned block and a continuation
    first = generator.generate(clip, blocks, seed=7).audio.samples
    assert first.std() > 1e-3  # real audio, not silence
    np.testing.assert_array_equal(generator.generate(clip, blocks, seed=7).audio.samples, first)
    assert not np.allclose(generator.generate(clip, blocks, seed=8).audio.samples, first)


def test_melody_changes_the_music(generator, clip):
    blocks = _blocks(1, 1)
    other = Audio(0.5 * np.sin(2 * np.pi * 440 * np.arange(15 * 44100) / 44100), 44100)
    assert not torch.equal(melody_chroma(clip.samples), melody_chroma(other.samples))
    ours = generator.generate(clip, blocks, seed=3).audio.samples
    assert not np.allclose(generator.generate(other, blocks, seed=3).audio.samples, ours)


def test_caption_changes_the_music(generator, clip):
    jazz = generator.generate(clip, _blocks(1, 1, caption="cosy jazz carol"), seed=3).audio.samples
    metal = generator.generate(clip, _blocks(1, 1, caption="loud heavy metal"), seed=3).audio.samples
    assert not np.allclose(jazz, metal)


def test_blocks_continue_the_previous_codes_and_join_without_a_seam(generator, clip, monkeypatch):
    recorder = Recorder(generator.decoder)
    monkeypatch.setattr(generator, "decoder", recorder)
    track = generator.generate(clip, _blocks(6, 4), seed=1).audio.samples
    (first, codes), (second, codes_2) = recorder.calls
    assert first["prompt_codes"] is None and first["input_features"] is not None
    prompt = second["prompt_codes"]
    assert prompt.shape[-1] == 160  # the last 3.2 s of block 1, as codes
    assert torch.equal(prompt, codes[..., -160:])
    # The joined track is what one EnCodec pass over all the codes gives: trimming and fades are exact.
    all_codes = torch.cat([codes, codes_2[..., 160:]], dim=-1)
    np.testing.assert_allclose(track, generator._decode(all_codes)[: len(track)], atol=1e-5)


@pytest.mark.parametrize("kept_seconds, total", [(2.0, 3), (3.0, 5)])  # a redo from block 3; an extension by 2
def test_a_continuation_keeps_the_kept_track_up_to_its_seam(generator, clip, kept_seconds, total):
    """Redo and Extend: the kept part's codes and samples stay, at the gain it was delivered at."""
    gain = 0.5
    first = generator.generate(clip, _blocks(3, 1), seed=1)
    kept = first.until(kept_seconds)
    delivered = Rendered(Audio(kept.audio.samples * gain, SAMPLE_RATE), kept.codes)
    frames = round(kept_seconds * 50)
    blocks = [
        dataclasses.replace(b, description="cosy jazz")
        for b in plan_blocks(total, SEGMENTS_2, 1, start=kept_seconds, first_index=round(kept_seconds))
    ]
    again = generator.generate(clip, blocks, seed=9, start=delivered, gain=gain)
    assert len(again.audio.samples) == total * SAMPLE_RATE
    assert torch.equal(again.codes[..., :frames], first.codes[..., :frames])
    seam = frames * 640 - round((EDGE_SECONDS + CROSSFADE_SECONDS) * SAMPLE_RATE)
    np.testing.assert_array_equal(again.audio.samples[:seam], delivered.audio.samples[:seam])
    # After the seam: one EnCodec pass over all the codes, at the same gain.
    whole = generator._decode(again.codes.to(generator.device)) * gain
    np.testing.assert_allclose(
        again.audio.samples[frames * 640 :], whole[frames * 640 : total * SAMPLE_RATE], atol=1e-5
    )
    if kept_seconds < first.audio.duration:  # a redo: the regenerated block is a new take
        assert not torch.equal(again.codes[..., frames:], first.codes[..., frames:])


def test_a_continuation_must_start_where_the_kept_track_ends(generator, clip):
    kept = generator.generate(clip, _blocks(2, 1), seed=1)
    with pytest.raises(ValueError, match="must start at 2.0 s"):
        generator.generate(clip, _blocks(3, 1)[1:], seed=0, start=kept)
    with pytest.raises(ValueError, match="does not fall on an EnCodec frame"):
        kept.until(1.001)


def test_continuation_melody_lines_up_with_its_new_frames(generator, clip, monkeypatch):
    """Block 2's chroma: the prompt audio's, then its own segment's from exactly where new frames start."""
    recorder = Recorder(generator.decoder)
    monkeypatch.setattr(generator, "decoder", recorder)
    generator.generate(clip, _blocks(6, 4), seed=1)
    (_, codes), (second, _) = recorder.calls
    chroma = second["input_features"][0].cpu()
    prompt_audio = generator._decode(codes)[-160 * 640 :]
    segment = resample(clip, SAMPLE_RATE).samples[10 * SAMPLE_RATE : 15 * SAMPLE_RATE]  # block 2 follows segment 2
    hops = 160 * 640 // 4096  # the prompt is 25 chroma hops; frames 2 hops from an edge see only one side
    torch.testing.assert_close(chroma[2 : hops - 2], melody_chroma(prompt_audio)[2 : hops - 2])
    torch.testing.assert_close(chroma[hops + 2 : hops + 38], melody_chroma(segment)[2:38])


def test_continuations_can_leave_the_melody_out(clip):
    plain = Generator.load("tiny", "facebook/musicgen-melody", torch.device("cpu"), BLOCK_SECONDS)
    plain.melody_on_continuations = False
    recorder = Recorder(plain.decoder)
    plain.decoder = recorder
    plain.generate(clip, _blocks(2, 1), seed=1)
    assert [kwargs["input_features"] is not None for kwargs, _ in recorder.calls] == [True, False]


@pytest.mark.parametrize("duration, block_seconds", [(1, 1), (2, 1), (2.5, 1), (3, 1), (2.33, 1), (25, 10)])
def test_output_length_is_exact(generator, clip, duration, block_seconds):
    """10, 20, 25 and 30 s at a tenth of the scale, an unaligned length, and 25 s with real 10 s blocks."""
    track = generator.generate(clip, _blocks(duration, block_seconds), seed=0).audio
    assert track.sample_rate == SAMPLE_RATE
    assert len(track.samples) == round(duration * SAMPLE_RATE)


def test_progress_reports_block_and_step(generator, clip):
    reports = []
    generator.generate(clip, _blocks(2.5, 1), seed=0, progress=reports.append)
    assert {r.stage for r in reports} == {"generating"}
    assert [(r.block, r.blocks) for r in reports] == [(1, 3)] * 50 + [(2, 3)] * 50 + [(3, 3)] * 25
    assert [r.step for r in reports] == list(range(1, 51)) * 2 + list(range(1, 26))
    assert [r.steps for r in reports] == [50] * 100 + [25] * 25


def test_cancel_stops_mid_generation(generator, clip):
    cancel, reports = CancelToken(), []

    def progress(report):
        reports.append(report)
        if report.block == 2 and report.step == 10:
            cancel.cancel()

    with pytest.raises(Cancelled):
        generator.generate(clip, _blocks(3, 1), seed=0, progress=progress, cancel=cancel)
    assert (reports[-1].block, reports[-1].step) == (2, 10)  # stopped at the very next step


def test_a_very_long_description_still_generates(generator, clip):
    blocks = _blocks(1, 1, caption="a festive orchestral carol with strings and bells " * 60)
    assert len(generator.tokenizer(blocks[0].description).input_ids) > 1000
    assert len(generator.generate(clip, blocks, seed=0).audio.samples) == SAMPLE_RATE


def test_blocks_with_a_gap_are_refused(generator, clip):
    gapped = [Block(0, 0, 10, 0, 0.0, 10.0), Block(1, 12, 20, 0, 0.0, 10.0)]
    with pytest.raises(ValueError, match="without gaps"):
        generator.generate(clip, gapped, seed=0)


def test_block_longer_than_the_generator_was_sized_for_is_refused(generator, clip):
    with pytest.raises(ValueError, match="longer than the 10 s blocks"):
        generator.generate(clip, _blocks(11, 11), seed=0)


def test_blocks_beyond_musicgens_context_are_refused_at_load():
    from mtm_bot.stages.generator import build_tiny_musicgen

    model, tokenizer = build_tiny_musicgen("melody")
    with pytest.raises(ValueError, match="30 s context"):
        Generator(model, tokenizer, torch.device("cpu"), block_seconds=28)


def test_text_only_musicgen_generates_without_melody(clip):
    from mtm_bot.stages.generator import build_tiny_musicgen

    model, tokenizer = build_tiny_musicgen("small")
    small = Generator(model, tokenizer, torch.device("cpu"), BLOCK_SECONDS)
    assert not small.uses_melody
    track = small.generate(clip, _blocks(2, 1), seed=0).audio
    assert len(track.samples) == 2 * SAMPLE_RATE and track.samples.std() > 1e-3


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["melody", "small"])
def test_full_profile_loads_a_saved_checkpoint_and_its_tokenizer(tmp_path, clip, kind):
    from mtm_bot.stages.generator import build_tiny_musicgen

    model, tokenizer = build_tiny_musicgen(kind)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = Generator.load("full", str(tmp_path), torch.device("cpu"), BLOCK_SECONDS)
    assert loaded.uses_melody == (kind == "melody")
    reference = Generator(model, tokenizer, torch.device("cpu"), BLOCK_SECONDS)
    blocks = _blocks(1, 1)
    np.testing.assert_array_equal(
        loaded.generate(clip, blocks, seed=5).audio.samples, reference.generate(clip, blocks, seed=5).audio.samples
    )


def test_missing_weights_are_reported_not_crashed():
    from mtm_bot.core.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="python -m mtm_bot download"):
        Generator.load("full", "facebook/musicgen-melody-not-cached", torch.device("cpu"), BLOCK_SECONDS)


def test_a_non_musicgen_checkpoint_is_refused(tmp_path):
    from transformers import T5Config

    from mtm_bot.core.settings import SettingsError

    T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(tmp_path)
    with pytest.raises(SettingsError, match="not a MusicGen checkpoint"):
        Generator.load("full", str(tmp_path), torch.device("cpu"), BLOCK_SECONDS)


def _tone(hz: float, seconds: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE)).astype(np.float32)


@pytest.mark.parametrize("segment_seconds", [1.0, 5.0, 8.0])
def test_continuation_chroma_tiles_only_its_segment_not_the_prompt(segment_seconds):
    """The last block of a clip whose length is no multiple of 10 s: a short segment after a 3.2 s prompt.
    The prompt's pitches (A) must not come back inside the new frames, which follow the segment (C)."""
    prompt, segment = _tone(440.0, 3.2), _tone(523.25, segment_seconds)
    chroma = melody_chroma(np.concatenate([prompt, segment]), prompt_samples=len(prompt)).numpy()
    pitch = chroma.argmax(1)
    hops = len(prompt) // 4096  # 25: the prompt's frames, kept once where its codes are
    assert (pitch[: hops - 1] == 9).all()  # A
    new_frames = pitch[hops + 1 :]  # the frame on the boundary hears both tones
    assert len(new_frames) == CHROMA_LENGTH - hops - 1
    assert (new_frames == 0).mean() > 0.97  # C; tiling the prompt too gave 20-70 % A here


def test_last_short_block_is_guided_by_its_own_segment_only(generator, monkeypatch):
    """Through the generator: block 2 follows a 1.25 s segment; its chroma after the prompt is that segment's."""
    clip = Audio(np.concatenate([_tone(440.0, 4.0), _tone(523.25, 1.25)]), SAMPLE_RATE)
    recorder = Recorder(generator.decoder)
    monkeypatch.setattr(generator, "decoder", recorder)
    blocks = _blocks(8, 4, segments=[(0.0, 4.0), (4.0, 5.25)])
    generator.generate(clip, blocks, seed=1)
    (_, codes), (second, _) = recorder.calls
    pitch = second["input_features"][0].cpu().numpy().argmax(1)
    hops = 160 * 640 // 4096
    assert (pitch[hops + 1 :] == 0).mean() > 0.97


def test_a_continuation_at_a_gain_that_would_clip_is_limited_to_the_true_peak_ceiling(generator, clip):
    """Extend/Redo scale new audio by the kept track's gain; where that would take it past -1 dBTP (the
    original's gain may have been lowered by its own peaks, and new music can be louder), the new part is
    lowered as far as needed, and the kept part stays sample for sample."""
    gain = 40.0  # far more than the tiny model's output can take
    first = generator.generate(clip, _blocks(3, 1), seed=1)
    kept = first.until(2.0)
    delivered = Rendered(Audio(kept.audio.samples * 0.5, SAMPLE_RATE), kept.codes)
    blocks = [
        dataclasses.replace(b, description="cosy jazz") for b in plan_blocks(4, SEGMENTS_2, 1, start=2.0, first_index=2)
    ]
    again = generator.generate(clip, blocks, seed=9, start=delivered, gain=gain)
    seam = 2 * SAMPLE_RATE - round((EDGE_SECONDS + CROSSFADE_SECONDS) * SAMPLE_RATE)
    np.testing.assert_array_equal(again.audio.samples[:seam], delivered.audio.samples[:seam])
    new_part = Audio(again.audio.samples[2 * SAMPLE_RATE :], SAMPLE_RATE)
    assert true_peak_dbfs(new_part) <= -1.0 + 1e-3 and np.abs(new_part.samples).max() < 1.0
    assert again.gain < gain / 4  # lowered, and reported for the next continuation
    whole = generator._decode(again.codes.to(generator.device)) * again.gain
    np.testing.assert_allclose(new_part.samples, whole[2 * SAMPLE_RATE : 4 * SAMPLE_RATE], atol=1e-5)
