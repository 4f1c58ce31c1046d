"""Deterministic test audio: music-like clips and a set of malformed uploads.

`music()` is a small synthesiser (chords, bass, melody, kick and hi-hat at 120 BPM) so that tests
exercise the pipeline with something that has pitch, harmony, rhythm and dynamics, not white noise.
`bad_files()` writes one file per way an upload can be broken, with the error `load_clip` must raise.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from mtm_bot.core.errors import ClipTooLong, ClipTooShort, EmptyAudio, NotAudio, TruncatedAudio

BEAT_SECONDS = 0.5  # 120 BPM
BAR_SECONDS = 4 * BEAT_SECONDS
# C - G - Am - F, one chord per bar, as MIDI notes (root position, around middle C).
PROGRESSION = [(60, 64, 67), (55, 59, 62), (57, 60, 64), (53, 57, 60)]
C_MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def _tone(hz: float, seconds: float, rate: int, harmonics: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return sum(np.sin(2 * np.pi * hz * k * t) / k for k in range(1, harmonics + 1))


def _place(out: np.ndarray, start: float, note: np.ndarray, rate: int) -> None:
    i = int(start * rate)
    n = min(len(note), len(out) - i)
    if n > 0:
        out[i : i + n] += note[:n]


def _stems(seconds: float, rate: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    stems = {name: np.zeros(n) for name in ("pad", "bass", "melody", "drums")}

    bar_t = np.arange(int(BAR_SECONDS * rate)) / rate
    pad_env = np.minimum(1.0, bar_t / 0.15) * np.minimum(1.0, (BAR_SECONDS - bar_t) / 0.3)
    beat_t = np.arange(int(BEAT_SECONDS * rate)) / rate
    eighth_t = beat_t[: len(beat_t) // 2]
    kick = np.sin(2 * np.pi * np.cumsum(50 + 100 * np.exp(-beat_t * 30)) / rate) * np.exp(-beat_t * 12)

    for bar in range(int(np.ceil(seconds / BAR_SECONDS))):
        start = bar * BAR_SECONDS
        chord = PROGRESSION[bar % len(PROGRESSION)]
        for note in chord:
            _place(stems["pad"], start, 0.25 * pad_env * _tone(_hz(note), BAR_SECONDS, rate, 3), rate)
        for beat in range(4):
            t0 = start + beat * BEAT_SECONDS
            _place(
                stems["bass"], t0, 0.5 * np.exp(-beat_t * 4) * _tone(_hz(chord[0] - 12), BEAT_SECONDS, rate, 4), rate
            )
            if beat in (0, 2):
                _place(stems["drums"], t0, 0.9 * kick, rate)
            for half in (0, 1):
                hat = np.diff(rng.standard_normal(len(eighth_t) + 1)) * np.exp(-eighth_t * 60)
                _place(stems["drums"], t0 + half * BEAT_SECONDS / 2, 0.08 * hat, rate)
                # Melody: mostly chord tones, sometimes a scale step, now and then a rest.
                if rng.random() < 0.15:
                    continue
                pitch = rng.choice(chord) + 12 if rng.random() < 0.7 else 72 + rng.choice(C_MAJOR)
                pluck = np.minimum(1.0, eighth_t / 0.005) * np.exp(-eighth_t * 6)
                _place(
                    stems["melody"],
                    t0 + half * BEAT_SECONDS / 2,
                    0.35 * pluck * _tone(_hz(pitch), BEAT_SECONDS / 2, rate, 5),
                    rate,
                )
    return stems


def music(seconds: float, rate: int = 32000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Music-like float32 audio, peak 0.5: shape (n,) for mono, (n, channels) otherwise. Deterministic."""
    stems = _stems(seconds, rate, seed)
    if channels == 1:
        mix = sum(stems.values())[:, None]
    else:
        # Pan the melody left and the pad right so channels differ; extra channels repeat the pair.
        left = stems["bass"] + stems["drums"] + 0.8 * stems["melody"] + 0.4 * stems["pad"]
        right = stems["bass"] + stems["drums"] + 0.4 * stems["melody"] + 0.8 * stems["pad"]
        mix = np.stack([(left, right)[c % 2] for c in range(channels)], axis=1)
    mix *= 0.5 / max(np.abs(mix).max(), 1e-9)
    out = mix.astype(np.float32)
    return out[:, 0] if channels == 1 else out


def write_music(
    path: str | Path, seconds: float, rate: int = 32000, channels: int = 1, subtype: str | None = None, seed: int = 0
) -> Path:
    """Write `music()` to `path`; the container comes from the suffix, `subtype` as in soundfile."""
    path = Path(path)
    data = music(seconds, rate, channels, seed)
    with sf.SoundFile(path, "w", rate, channels, subtype) as f:
        for start in range(0, len(data), 1 << 15):  # one big write crashes libvorbis past ~90 s
            f.write(data[start : start + (1 << 15)])
    return path


def wav_claiming(path: str | Path, seconds: float, actual_seconds: float = 0.05, rate: int = 8000) -> Path:
    """A 16-bit WAV whose header claims `seconds` of audio but which holds only `actual_seconds`."""
    pcm = (music(actual_seconds, rate) * 32767).astype("<i2").tobytes()
    claimed = int(seconds * rate) * 2
    header = b"RIFF" + struct.pack("<I", 36 + claimed) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", claimed)
    Path(path).write_bytes(header + pcm)
    return Path(path)


def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def bad_files(tmpdir: str | Path) -> dict[str, tuple[Path, type[Exception]]]:
    """One malformed upload per failure kind, with the error `load_clip` (default limits) must raise."""
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    files: dict[str, tuple[Path, type[Exception]]] = {}

    def add(name: str, path: Path, error: type[Exception]) -> None:
        files[name] = (path, error)

    (d / "empty.wav").write_bytes(b"")
    add("empty file", d / "empty.wav", EmptyAudio)
    (d / "notes.wav").write_text("These are my song notes, not a recording.\n" * 20)
    add("text renamed .wav", d / "notes.wav", NotAudio)
    (d / "cover.wav").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + rng.bytes(600))
    add("PNG bytes as .wav", d / "cover.wav", NotAudio)
    (d / "noise.mp3").write_bytes(rng.bytes(4000))
    add("random bytes .mp3", d / "noise.mp3", NotAudio)
    (d / "broken.flac").write_bytes(b"fLaC" + rng.bytes(300))
    add("broken FLAC header", d / "broken.flac", NotAudio)
    add("truncated WAV", _truncate(write_music(d / "cut.wav", 3.0, rate=16000, subtype="PCM_16"), 0.5), TruncatedAudio)
    add("truncated FLAC", _truncate(write_music(d / "cut.flac", 3.0, rate=16000), 0.5), TruncatedAudio)
    add("truncated MP3", _truncate(write_music(d / "cut.mp3", 3.0, rate=16000), 0.5), TruncatedAudio)
    add("WAV header claiming 10 h", wav_claiming(d / "ten_hours.wav", 10 * 3600), ClipTooLong)
    add("0.5 s clip", write_music(d / "short.wav", 0.5, rate=16000), ClipTooShort)
    add("75 s clip", write_music(d / "long.wav", 75.0, rate=8000, subtype="PCM_U8"), ClipTooLong)
    sf.write(d / "zero_frames.wav", np.zeros(0, np.float32), 16000, subtype="PCM_16")
    add("zero-frame WAV", d / "zero_frames.wav", EmptyAudio)
    sf.write(d / "silent.wav", np.zeros(3 * 16000, np.float32), 16000, subtype="PCM_16")
    add("digital silence", d / "silent.wav", EmptyAudio)
    nan = music(2.0, 16000)
    nan[1000:1100] = np.nan
    sf.write(d / "nan.wav", nan, 16000, subtype="FLOAT")
    add("NaN samples in a float WAV", d / "nan.wav", NotAudio)
    return files
