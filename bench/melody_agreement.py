"""Benchmark: does MusicGen-melody's chroma follow the melody better with drums and bass taken out?

    python -m bench.melody_agreement [--scores bach/bwv66.6 bach/bwv86.6 ...] [--bpm 100]

Prints one JSON object per corpus, then the means. Corpora: `band` (below), `melody_and_chords` (the
same scores' soprano, alto and tenor only: no bass, no drums), `sung_alone` (the soprano alone an octave
down on GM "Voice Oohs" and "Choir Aahs": a man singing the tune) and `hum` (numpy-synthesised hums in
four registers, see hum()). In `band`, each score (Bach chorales from music21's corpus by default) is arranged for
a band: soprano (the melody) on a lead instrument, alto and tenor on two others, the bass part an
octave down on a bass guitar, plus a drum part (kick on beats 1 and 3, snare on 2 and 4, closed
hi-hat on every eighth, MIDI channel 10). FluidSynth renders it with a General MIDI soundfont at
32 kHz (the first 30 s, what the chroma sees). Every variant's number is the share of chroma frames
whose one-hot pitch class is the pitch class of the melody note sounding at the frame's centre
(frames where the melody rests are left out):

- `raw`: the mix as it is; `high_pass`: always high-passed (mtm_bot.stages.melody.remove_bass);
  `bot`: melody_chroma as the generator calls it (high-passed where has_bass_line finds a bass line);
- `high_pass_<Hz>`: mtm_bot.stages.melody.remove_bass at other cutoffs;
- `hpss_high_pass_<Hz>`: drums removed first by a harmonic/percussive split (median filtering,
  Fitzgerald 2010, as librosa.decompose.hpss), then the high-pass: what the bot would gain from it;
- `melody_alone`: the soprano rendered on its own, the ceiling of what any separation could reach
  (a lead whose upper harmonics are strong can sit on the fifth even alone).

Extra installs (the benchmark only; the bot and its tests need none of them), as for
bench/fluidsynth_render.py:

    apt-get install fluidsynth fluid-soundfont-gm
    .venv/bin/pip install music21
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import median_filter
from scipy.signal import istft, stft

from bench import fluidsynth_render
from mtm_bot.stages.generator import CHROMA_HOP, CHROMA_MAX_SAMPLES, SAMPLE_RATE, melody_chroma
from mtm_bot.stages.melody import BASS_CUTOFF_HZ, remove_bass

SCORES = ["bach/bwv66.6", "bach/bwv86.6", "bach/bwv153.1", "bach/bwv269", "bach/bwv347"]
# General MIDI programs (0-based) per voice; each score takes the next line, so timbres vary.
BANDS = [
    {"Soprano": 73, "Alto": 71, "Tenor": 60, "Bass": 33},  # flute, clarinet, horn, fingered bass
    {"Soprano": 40, "Alto": 41, "Tenor": 42, "Bass": 32},  # violin, viola, cello, acoustic bass
    {"Soprano": 56, "Alto": 65, "Tenor": 57, "Bass": 34},  # trumpet, alto sax, trombone, picked bass
    {"Soprano": 68, "Alto": 0, "Tenor": 24, "Bass": 33},  # oboe, piano, nylon guitar, fingered bass
    {"Soprano": 80, "Alto": 4, "Tenor": 48, "Bass": 38},  # square lead, e-piano, strings, synth bass
]
VELOCITY = {"Soprano": 90, "Alto": 75, "Tenor": 75, "Bass": 110}
KICK, SNARE, HIHAT = 36, 38, 42
CUTOFFS_HZ = (150.0, 250.0, 350.0, 450.0)
VOICE_OOHS, CHOIR_AAHS = 53, 52
HUM_REGISTERS = [(43, 55), (48, 60), (55, 67), (60, 72)]  # MIDI: G2-G3, C3-C4 (men), G3-G4, C4-C5
HUM_ROLLOFFS = (1.5, 2.0, 2.5)


@dataclass(frozen=True)
class MelodyNote:
    start: float  # seconds
    end: float
    pitch_class: int


def arrange(name: str, band: dict[str, int], bpm: float):
    """The chorale as a band score with a drum part, and its soprano line in seconds."""
    from music21 import corpus, instrument, note, stream, tempo

    score = corpus.parse(name).expandRepeats().stripTies()
    seconds_per_quarter = 60.0 / bpm
    for mark in list(score.recurse().getElementsByClass(tempo.MetronomeMark)):
        mark.activeSite.remove(mark)
    melody = []
    for part in score.parts:
        voice = part.partName
        for old in list(part.recurse().getElementsByClass(instrument.Instrument)):
            old.activeSite.remove(old)
        lead = instrument.Instrument()
        lead.midiProgram = band[voice]
        part.insert(0, lead)
        for n in part.recurse().notes:
            n.volume.velocity = VELOCITY[voice]
            if voice == "Bass":
                n.transpose(-12, inPlace=True)
        if voice == "Soprano":
            melody = [
                MelodyNote(
                    n.getOffsetInHierarchy(score) * seconds_per_quarter,
                    (n.getOffsetInHierarchy(score) + n.quarterLength) * seconds_per_quarter,
                    n.pitch.pitchClass,
                )
                for n in part.recurse().notes
            ]
    score.parts[0].insert(0, tempo.MetronomeMark(number=bpm))

    drums = stream.Part()
    drums.insert(0, instrument.UnpitchedPercussion())  # music21 writes its notes on channel 10
    for eighth in range(int(score.highestTime * 2)):
        hits = [HIHAT] + ([KICK] if eighth % 4 == 0 else [SNARE] if eighth % 4 == 2 else [])
        for pitch in hits:
            hit = note.Note(pitch, quarterLength=0.5)
            hit.volume.velocity = 110 if pitch != HIHAT else 80
            drums.insert(eighth * 0.5, hit)
    score.insert(0, drums.makeMeasures())  # music21's MIDI writer wants measures in every part
    return score, melody


def render(score, workdir: Path) -> np.ndarray:
    """FluidSynth's rendering of the score: 32 kHz mono float32, the first 30 s."""
    return fluidsynth_render.render(score, workdir, SAMPLE_RATE)[:CHROMA_MAX_SAMPLES]


def keep_parts(score, count: int, program: int | None = None, semitones: int = 0):
    """A copy of the band score with only its first `count` parts (soprano, alto, tenor), optionally on
    another General MIDI `program` and transposed: no bass, no drums."""
    kept = copy.deepcopy(score)
    for part in list(kept.parts)[count:]:
        kept.remove(part)
    for part in kept.parts:
        if program is not None:
            from music21 import instrument

            part.recurse().getElementsByClass(instrument.Instrument).first().midiProgram = program
        if semitones:
            for n in part.recurse().notes:
                n.transpose(semitones, inPlace=True)
    return kept


def hum(register: tuple[int, int], rolloff: float, seed: int, seconds: float = 30.0):
    """A hummed tune synthesised in numpy: a stepwise random melody in the MIDI `register`, each note a
    harmonic series with amplitudes 1/k**rolloff, 5.5 Hz vibrato of a third of a semitone, soft
    attacks, short breaths between phrases and breath noise. Returns the samples and the melody."""
    rng = np.random.default_rng(seed)
    low, high = register
    pitch, clock, out, melody = (low + high) // 2, 0.0, [], []
    while clock < seconds:
        pitch = int(np.clip(pitch + rng.integers(-3, 4), low, high))
        length = float(rng.choice([0.25, 0.5, 0.5, 0.75, 1.0]))
        t = np.arange(round(length * SAMPLE_RATE)) / SAMPLE_RATE
        hz = 440.0 * 2.0 ** ((pitch - 69 + np.sin(2 * np.pi * 5.5 * t + rng.uniform(0, 6.3)) / 3) / 12)
        phase = 2 * np.pi * np.cumsum(hz) / SAMPLE_RATE
        tone = sum(np.sin(k * phase) / k**rolloff for k in range(1, int(12000 / hz.max()) + 1))
        envelope = np.minimum(1.0, np.minimum(t / 0.04, (length - t) / 0.04))
        out.append(0.3 * tone * envelope)
        melody.append(MelodyNote(clock, clock + length, pitch % 12))
        clock += length
        if rng.random() < 0.15:  # a breath
            out.append(np.zeros(round(0.3 * SAMPLE_RATE)))
            clock += 0.3
    samples = np.concatenate(out)[: round(seconds * SAMPLE_RATE)]
    samples = samples + 0.003 * rng.standard_normal(len(samples))
    return samples.astype(np.float32), melody


def without_drums(
    samples: np.ndarray, n_fft: int = 4096, harmonic_frames: int = 9, percussive_bins: int = 33
) -> np.ndarray:
    """The harmonic part of a harmonic/percussive split: median filters along time (a sustained note is
    a horizontal line) and frequency (a drum hit is a vertical one), then a soft mask."""
    hop = n_fft // 4
    _, _, spec = stft(samples, nperseg=n_fft, noverlap=n_fft - hop)
    magnitude = np.abs(spec)
    harmonic = median_filter(magnitude, size=(1, harmonic_frames)) ** 2
    percussive = median_filter(magnitude, size=(percussive_bins, 1)) ** 2
    _, out = istft(spec * harmonic / np.maximum(harmonic + percussive, 1e-20), nperseg=n_fft, noverlap=n_fft - hop)
    return out[: len(samples)].astype(np.float32)


def agreement(chroma: np.ndarray, melody: list[MelodyNote]) -> float:
    """Share of frames (with a melody note at their centre) whose one-hot pitch class is that note's."""
    hits = frames = 0
    for index, row in enumerate(chroma):
        centre = index * CHROMA_HOP / SAMPLE_RATE
        sounding = [n for n in melody if n.start <= centre < n.end]
        if sounding:
            frames += 1
            hits += int(row.argmax()) == sounding[0].pitch_class
    return hits / frames


def scores_of(
    mix: np.ndarray, melody: list[MelodyNote], alone: np.ndarray | None = None, extra: bool = False
) -> dict[str, float]:
    """Agreement of every variant's chroma with the melody; `alone` is the melody rendered without the rest."""
    frames = len(mix) // CHROMA_HOP + 1  # melody_chroma tiles past these

    def score_of(chroma) -> float:
        return round(agreement(chroma[:frames].numpy(), melody), 3)

    row = {
        "raw": score_of(melody_chroma(mix, filter_bass=False)),
        "high_pass": score_of(melody_chroma(remove_bass(mix, SAMPLE_RATE), filter_bass=False)),
        "bot": score_of(melody_chroma(mix)),
    }
    if extra:
        for cutoff in CUTOFFS_HZ:
            row[f"high_pass_{cutoff:.0f}"] = score_of(
                melody_chroma(remove_bass(mix, SAMPLE_RATE, cutoff), filter_bass=False)
            )
        row[f"hpss_high_pass_{BASS_CUTOFF_HZ:.0f}"] = score_of(
            melody_chroma(remove_bass(without_drums(mix), SAMPLE_RATE), filter_bass=False)
        )
    if alone is not None:
        row["melody_alone"] = score_of(melody_chroma(alone, filter_bass=False))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", nargs="+", default=SCORES, help="music21 corpus names")
    parser.add_argument("--bpm", type=float, default=100.0)
    args = parser.parse_args()
    fluidsynth_render.require_fluidsynth()

    corpora: dict[str, list[dict]] = {"band": [], "hum": [], "sung_alone": [], "melody_and_chords": []}
    with tempfile.TemporaryDirectory() as tmp:
        for number, name in enumerate(args.scores):
            band = BANDS[number % len(BANDS)]
            score, melody = arrange(name, band, args.bpm)
            soprano = render(keep_parts(score, 1), Path(tmp))
            corpora["band"].append(
                {"clip": name, "band": band, **scores_of(render(score, Path(tmp)), melody, soprano, extra=True)}
            )
            corpora["melody_and_chords"].append(
                {"clip": name, **scores_of(render(keep_parts(score, 3), Path(tmp)), melody, soprano)}
            )
            for program in (VOICE_OOHS, CHOIR_AAHS):  # an octave down: a man singing the tune
                corpora["sung_alone"].append(
                    {
                        "clip": f"{name} program {program}",
                        **scores_of(render(keep_parts(score, 1, program, -12), Path(tmp)), melody),
                    }
                )
    for number, (register, rolloff) in enumerate(itertools.product(HUM_REGISTERS, HUM_ROLLOFFS)):
        samples, melody = hum(register, rolloff, seed=number)
        corpora["hum"].append(
            {"clip": f"midi {register[0]}-{register[1]} rolloff {rolloff}", **scores_of(samples, melody)}
        )

    report = {"bpm": args.bpm, "bot_cutoff_hz": BASS_CUTOFF_HZ}
    for corpus, rows in corpora.items():
        variants = [key for key in rows[0] if key not in ("clip", "band")]
        report[corpus] = {
            "clips": rows,
            "mean": {variant: round(statistics.mean(r[variant] for r in rows), 3) for variant in variants},
        }
    print(json.dumps(report, indent=2))
    print(json.dumps({corpus: report[corpus]["mean"] for corpus in corpora}, indent=2))


if __name__ == "__main__":
    main()
