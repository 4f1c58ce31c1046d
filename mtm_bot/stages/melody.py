"""The melody part of a mix, for MusicGen-melody's chroma: the bass (and the kick drum) filtered out.

MusicGen-melody was trained on the chroma of the mix without drums and bass (audiocraft's
ChromaStemConditioner keeps htdemucs' "vocals" and "other" stems), because they dominate the chroma
otherwise. Demucs would need its own weights and a second large model per request. What we measured
instead (bench/melody_agreement.py: band arrangements of Bach chorales with drums and a bass guitar,
rendered by FluidSynth) is that the bass is what pulls the one-hot chroma off the melody, and a steep
high-pass removes it and the kick drum; the drums' broadband hits (snare, hi-hat) spread over all
twelve pitch classes and seldom win a frame, so a harmonic/percussive split added nothing on top.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import scipy.fft
from scipy.signal import butter, sosfiltfilt

# Above the bass (a bass guitar's fundamentals reach ~200 Hz, its strong 2nd harmonic ~400 Hz) and in
# the lower half of a melody's range: a low melody note still has its harmonics above the cut, and the
# 2nd harmonic has the note's own pitch class. Agreement with the melody by cutoff: see the benchmark.
BASS_CUTOFF_HZ = 350.0
FILTER_ORDER = 8  # applied forwards and backwards (no phase shift): 96 dB per octave in all

ANALYSIS_N_FFT = 16384  # has_bass_line's frames: 0.5 s at 32 kHz, semitones resolved down to ~100 Hz
ANALYSIS_HOP = 4096
LOWEST_HZ, HIGHEST_HZ = 30.0, 5000.0  # the pitched range; above it hi-hats and noise
LOW_BAND_MIN_SHARE = 0.1  # frames with less of their power below the cut tell nothing about it
# Share of steady frames with the low band's pitch class or its fifth on top: 0.92-1.0 on hums and sung
# or played tunes alone, 0.12-0.76 on band mixes and on melodies over chords (bench/melody_agreement.py).
SINGLE_LINE_MIN_SHARE = 0.85


def has_bass_line(samples: np.ndarray, sample_rate: int, cutoff_hz: float = BASS_CUTOFF_HZ) -> bool:
    """Whether the band below `cutoff_hz` carries a line of its own (a bass under the melody) rather than
    the fundamentals of the melody itself (a hum, a low voice, a solo instrument).

    One voice's partials above the cut are its own harmonics: 2^n f (its pitch class) and 3 * 2^n f (its
    fifth). So in frames where one note holds, the strongest pitch class above the cut is the low band's
    or its fifth. A bass line (or a tenor part) under a melody agrees like that only where the melody sits
    on its octave or fifth: in at most 76 % of those frames on the benchmark's Bach chorales, against at
    least 92 % for hums and for tunes sung or played alone (bench/melody_agreement.py).
    Takes ~70 ms for 30 s at 32 kHz.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if len(samples) < ANALYSIS_N_FFT:
        samples = np.pad(samples, (0, ANALYSIS_N_FFT - len(samples)))
    frames = np.lib.stride_tricks.sliding_window_view(samples, ANALYSIS_N_FFT)[::ANALYSIS_HOP]
    hz = np.fft.rfftfreq(ANALYSIS_N_FFT, 1 / sample_rate)
    pitched = hz < HIGHEST_HZ
    hz = hz[pitched]
    spectra = scipy.fft.rfft(frames * np.hanning(ANALYSIS_N_FFT).astype(np.float32), axis=1)[:, pitched]
    power = spectra.real**2 + spectra.imag**2  # (frames, bins)
    pitch_classes = np.eye(12)[np.round(12 * np.log2(np.maximum(hz, 1.0) / 440.0)).astype(int) % 12]
    low = (hz >= LOWEST_HZ) & (hz < cutoff_hz)
    high = hz >= cutoff_hz
    low_class = (power[:, low] @ pitch_classes[low]).argmax(axis=1)
    high_class = (power[:, high] @ pitch_classes[high]).argmax(axis=1)
    has_low_band = power[:, low].sum(axis=1) > LOW_BAND_MIN_SHARE * power[:, low | high].sum(axis=1)
    # Steady: the same pitch classes as both neighbours (a frame across a note change mixes two notes).
    steady = np.zeros_like(has_low_band)
    steady[1:-1] = (
        (low_class[1:-1] == low_class[:-2])
        & (low_class[1:-1] == low_class[2:])
        & (high_class[1:-1] == high_class[:-2])
        & (high_class[1:-1] == high_class[2:])
    )
    telling = has_low_band & steady
    if not telling.any():
        return False  # no low band to speak of: the high-pass would change nothing that matters
    own_partials = np.isin((high_class - low_class)[telling] % 12, (0, 7))
    return bool(own_partials.mean() < SINGLE_LINE_MIN_SHARE)


def remove_bass(samples: np.ndarray, sample_rate: int, cutoff_hz: float = BASS_CUTOFF_HZ) -> np.ndarray:
    """Mono float `samples` with everything below `cutoff_hz` filtered out; same length, float32."""
    samples = np.asarray(samples, dtype=np.float32)
    if len(samples) == 0:
        return samples
    sos = _high_pass(sample_rate, cutoff_hz)
    # sosfiltfilt's default edge padding (3 * (2 * sections + 1) samples) must be shorter than the signal.
    padlen = min(len(samples) - 1, 3 * (2 * len(sos) + 1))
    return sosfiltfilt(sos, samples, padlen=padlen).astype(np.float32)


@cache
def _high_pass(sample_rate: int, cutoff_hz: float) -> np.ndarray:
    return butter(FILTER_ORDER, cutoff_hz, btype="highpass", fs=sample_rate, output="sos")
