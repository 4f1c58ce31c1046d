"""The melody MusicGen is conditioned on: bass and drums must not take over the chroma."""

from __future__ import annotations

import numpy as np

from mtm_bot.stages.generator import CHROMA_HOP, CHROMA_N_FFT, PROMPT_SECONDS, SAMPLE_RATE, melody_chroma
from mtm_bot.stages.melody import has_bass_line, remove_bass

NOTE_SECONDS = 1.0
MELODY = [72, 76, 79, 77, 74, 72, 71, 74]  # C5 E5 G5 F5 D5 C5 B4 D5
BASS = [41, 45, 36, 43, 38, 45, 40, 43]  # F2 A2 C2 G2 D2 A2 E2 G2: never the melody's pitch class
MALE_HUM = [48, 50, 52, 53, 55, 53, 50, 47]  # C3 D3 E3 F3 G3 F3 D3 B2: fundamentals 123-196 Hz


def _note(midi: int, seconds: float, harmonics: int) -> np.ndarray:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    hz = 440.0 * 2.0 ** ((midi - 69) / 12)
    return sum(np.sin(2 * np.pi * hz * k * t) / k for k in range(1, harmonics + 1))


def _band() -> np.ndarray:
    """A quiet melody over a bass line four times as loud, a kick on every beat and a noisy snare."""
    melody = np.concatenate([0.25 * _note(m, NOTE_SECONDS, 4) for m in MELODY])
    bass = np.concatenate([1.0 * _note(b, NOTE_SECONDS, 8) for b in BASS])
    beat = np.arange(round(0.5 * SAMPLE_RATE)) / SAMPLE_RATE
    kick = np.sin(2 * np.pi * np.cumsum(50 + 100 * np.exp(-beat * 30)) / SAMPLE_RATE) * np.exp(-beat * 12)
    snare = np.random.default_rng(0).standard_normal(len(beat)) * np.exp(-beat * 25)
    drums = np.tile(np.concatenate([1.0 * kick, 0.5 * snare]), len(MELODY))
    return (melody + bass + drums).astype(np.float32)


def _hum(notes: list[int]) -> np.ndarray:
    """A hummed tune: harmonic series falling off as 1/k**2, with vibrato and a little breath noise."""
    t = np.arange(round(NOTE_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    tones = []
    for midi in notes:
        hz = 440.0 * 2.0 ** ((midi - 69 + np.sin(2 * np.pi * 5.5 * t) / 4) / 12)
        phase = 2 * np.pi * np.cumsum(hz) / SAMPLE_RATE
        tones.append(0.3 * sum(np.sin(k * phase) / k**2 for k in range(1, 40)))
    breath = 0.003 * np.random.default_rng(0).standard_normal(len(notes) * len(t))
    return (np.concatenate(tones) + breath).astype(np.float32)


def _melody_agreement(chroma: np.ndarray, melody: list[int] = MELODY) -> float:
    """Share of frames whose whole FFT window lies inside one melody note that show that note."""
    hits = frames = 0
    for index in range(len(melody) * round(NOTE_SECONDS * SAMPLE_RATE) // CHROMA_HOP):
        centre = index * CHROMA_HOP
        note = centre // round(NOTE_SECONDS * SAMPLE_RATE)
        if (
            (centre - CHROMA_N_FFT // 2) // round(NOTE_SECONDS * SAMPLE_RATE)
            == note
            == (centre + CHROMA_N_FFT // 2) // round(NOTE_SECONDS * SAMPLE_RATE)
        ):
            frames += 1
            hits += int(chroma[index].argmax()) == melody[note] % 12
    return hits / frames


def test_conditioning_chroma_follows_the_melody_not_the_bass():
    band = _band()
    conditioning = _melody_agreement(melody_chroma(band).numpy())
    raw = _melody_agreement(melody_chroma(band, filter_bass=False).numpy())
    assert conditioning >= 0.8, f"the chroma MusicGen gets shows the melody on only {conditioning:.0%} of frames"
    assert raw <= conditioning - 0.5, f"raw {raw:.0%} vs conditioning {conditioning:.0%}: the clip tests nothing"


def test_conditioning_chroma_keeps_a_low_hummed_tune():
    # A man humming around C3-G3: the fundamentals and 2nd harmonics lie below the bass cut, and above
    # it the 3rd harmonic (the fifth) outweighs the 4th: high-passed, the chroma would show the fifth.
    hum = _hum(MALE_HUM)
    conditioning = _melody_agreement(melody_chroma(hum).numpy(), MALE_HUM)
    assert conditioning >= 0.95, f"the chroma MusicGen gets shows the hummed tune on only {conditioning:.0%} of frames"
    high_passed = _melody_agreement(melody_chroma(remove_bass(hum, SAMPLE_RATE), filter_bass=False).numpy(), MALE_HUM)
    assert high_passed <= 0.75, f"high-passed {high_passed:.0%}: the hum tests nothing"


def test_a_bass_line_is_told_from_a_low_voice():
    assert has_bass_line(_band(), SAMPLE_RATE)
    assert not has_bass_line(_hum(MALE_HUM), SAMPLE_RATE)
    assert not has_bass_line(_hum(MELODY), SAMPLE_RATE)  # a high hum: its low band is nearly empty
    assert not has_bass_line(np.zeros(100, dtype=np.float32), SAMPLE_RATE)  # shorter than a frame


def test_remove_bass_keeps_the_melody_and_drops_the_bass():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    bass, melody = np.sin(2 * np.pi * 98.0 * t), np.sin(2 * np.pi * 523.25 * t)  # G2, C5
    out = remove_bass(bass + melody, SAMPLE_RATE)
    assert out.shape == t.shape and out.dtype == np.float32
    middle = slice(SAMPLE_RATE // 4, -SAMPLE_RATE // 4)
    assert np.sqrt(np.mean((out[middle] - melody[middle]) ** 2)) < 0.01  # bass gone, melody untouched
    short = remove_bass(melody[:100], SAMPLE_RATE)  # shorter than the filter's edge padding
    assert short.shape == (100,)


def test_a_continuation_keeps_a_hum_after_a_prompt_of_held_bass_notes():
    """Block 2 on: its chroma is taken over MusicGen's 3.2 s prompt, then the user's hum. The prompt's own
    bass (held A1 and E2 here) must not decide that the hum's low fundamentals are cut."""
    hum = _hum(MALE_HUM)
    prompt = np.concatenate([_note(midi, PROMPT_SECONDS / 2, 8) for midi in (33, 40)]).astype(np.float32)
    joined = np.concatenate([prompt, hum])
    assert has_bass_line(joined, SAMPLE_RATE) and not has_bass_line(hum, SAMPLE_RATE)  # judged together it would be cut
    chroma = melody_chroma(joined, prompt_samples=len(prompt)).numpy()
    after_prompt = chroma[-(-len(prompt) // CHROMA_HOP) :]
    agreement = _melody_agreement(after_prompt, MALE_HUM)
    assert agreement >= 0.95, f"as a continuation the chroma shows the hummed tune on only {agreement:.0%} of frames"
