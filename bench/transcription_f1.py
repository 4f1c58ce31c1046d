"""Benchmark: how many of a track's notes MIDI transcription (mtm_bot/stages/transcribe.py, basic-pitch) finds.

    python -m bench.transcription_f1 [--chorales bach/bwv66.6 ...] [--piano joplin/maple_leaf_rag ...]
                                     [--seconds 60] [--bpm 100]

Scores from music21's corpus are written as MIDI and rendered by FluidSynth (bench/fluidsynth_render.py)
at MusicGen's 32 kHz; the first `--seconds` of each rendering are transcribed and compared with the MIDI
file's notes (drums left out) by mir_eval's note-level precision, recall and F1
(mir_eval.transcription.precision_recall_f1_overlap): a transcribed note matches a reference note of the
same pitch (within 50 cents) whose onset is within 50 ms of its own (`onset`); `onset_offset` also wants
its offset within 20 % of the reference note's length or 50 ms, whichever is more. Corpora:

- `piano`: Bach chorales (four voices, bench/melody_agreement.py's arrangement without the drums, its
  bass an octave down) and the `--piano` pieces, all on General MIDI Acoustic Grand Piano: the kind of
  audio basic-pitch was trained on (its MAESTRO part);
- `band`: the same chorales arranged for a band with drums and a bass guitar (bench/melody_agreement.py's
  `arrange`: each score another line-up), like a generated track.

Prints one JSON object: per clip and per corpus (mean) the scores, and the transcription's speed as
wall-clock seconds per minute of audio (model loading excluded, reported apart).

Extra installs (the benchmark only), as for bench/fluidsynth_render.py:

    apt-get install fluidsynth fluid-soundfont-gm
    .venv/bin/pip install music21
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mir_eval
import numpy as np
import pretty_midi

from bench.fluidsynth_render import render_midi, require_fluidsynth
from bench.melody_agreement import BANDS, SCORES, arrange, keep_parts
from mtm_bot.core.audio import Audio
from mtm_bot.stages.generator import SAMPLE_RATE
from mtm_bot.stages.transcribe import Transcription, load_model, transcribe

PIANO_PIECES = ["joplin/maple_leaf_rag"]
ACOUSTIC_GRAND_PIANO = 0
ONSET_TOLERANCE = 0.05  # seconds (mir_eval's default)
OFFSET_RATIO = 0.2  # mir_eval's default


def chorale_on_piano(name: str, bpm: float):
    score, _ = arrange(name, dict.fromkeys(("Soprano", "Alto", "Tenor", "Bass"), ACOUSTIC_GRAND_PIANO), bpm)
    return keep_parts(score, 4)  # the four voices, without the drum part


def piano_piece(name: str):
    from music21 import corpus

    return corpus.parse(name)  # written for the piano: music21 writes it on program 0


def reference_notes(midi_path: Path, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Intervals (s) and pitches (Hz) of the pitched notes starting within the first `seconds`, ends cut there."""
    midi = pretty_midi.PrettyMIDI(str(midi_path))
    notes = [n for part in midi.instruments if not part.is_drum for n in part.notes if n.start < seconds]
    intervals = np.array([(n.start, min(n.end, seconds)) for n in notes]).reshape(-1, 2)
    return intervals, mir_eval.util.midi_to_hz(np.array([n.pitch for n in notes]))


def scores(reference: tuple[np.ndarray, np.ndarray], transcription: Transcription) -> dict[str, dict[str, float]]:
    est_intervals = np.array([(n.start, n.end) for n in transcription.notes]).reshape(-1, 2)
    est_hz = mir_eval.util.midi_to_hz(np.array([n.pitch for n in transcription.notes]))
    result = {}
    for name, offset_ratio in (("onset", None), ("onset_offset", OFFSET_RATIO)):
        precision, recall, f1, _ = mir_eval.transcription.precision_recall_f1_overlap(
            *reference, est_intervals, est_hz, onset_tolerance=ONSET_TOLERANCE, offset_ratio=offset_ratio
        )
        result[name] = {"precision": round(precision, 3), "recall": round(recall, 3), "f1": round(f1, 3)}
    return result


def measure(clip: str, score, workdir: Path, seconds: float) -> dict:
    midi_path = workdir / "score.mid"
    score.write("midi", fp=midi_path)
    audio = Audio(render_midi(midi_path, SAMPLE_RATE)[: int(seconds * SAMPLE_RATE)], SAMPLE_RATE)
    start = time.perf_counter()
    transcription = transcribe(audio)
    elapsed = time.perf_counter() - start
    reference = reference_notes(midi_path, audio.duration)
    return {
        "clip": clip,
        "audio_seconds": round(audio.duration, 2),
        "reference_notes": len(reference[1]),
        "transcribed_notes": len(transcription.notes),
        "transcribe_seconds": round(elapsed, 3),
        **scores(reference, transcription),
    }


def summary(rows: list[dict]) -> dict:
    mean = {
        metric: {key: round(statistics.mean(r[metric][key] for r in rows), 3) for key in ("precision", "recall", "f1")}
        for metric in ("onset", "onset_offset")
    }
    audio_minutes = sum(r["audio_seconds"] for r in rows) / 60
    return {
        "clips": rows,
        "mean": mean,
        "transcribe_seconds_per_audio_minute": round(sum(r["transcribe_seconds"] for r in rows) / audio_minutes, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chorales", nargs="+", default=SCORES, help="music21 corpus names: four-voice chorales")
    parser.add_argument("--piano", nargs="+", default=PIANO_PIECES, help="music21 corpus names: piano pieces")
    parser.add_argument("--seconds", type=float, default=60.0, help="transcribe the first seconds of each")
    parser.add_argument("--bpm", type=float, default=100.0, help="the chorales' tempo")
    args = parser.parse_args()
    require_fluidsynth()

    start = time.perf_counter()
    load_model()
    load_seconds = time.perf_counter() - start
    corpora: dict[str, list[dict]] = {"piano": [], "band": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for number, name in enumerate(args.chorales):
            corpora["piano"].append(measure(name, chorale_on_piano(name, args.bpm), workdir, args.seconds))
            band = BANDS[number % len(BANDS)]
            score, _ = arrange(name, band, args.bpm)
            corpora["band"].append({**measure(name, score, workdir, args.seconds), "band": band})
            print(
                f"{name}: piano {corpora['piano'][-1]['onset']}, band {corpora['band'][-1]['onset']}", file=sys.stderr
            )
        for name in args.piano:
            corpora["piano"].append(measure(name, piano_piece(name), workdir, args.seconds))
            print(f"{name}: piano {corpora['piano'][-1]['onset']}", file=sys.stderr)

    every_clip = [row for rows in corpora.values() for row in rows]
    report = {
        "onset_tolerance_s": ONSET_TOLERANCE,
        "offset_ratio": OFFSET_RATIO,
        "sample_rate": SAMPLE_RATE,
        "model_load_seconds": round(load_seconds, 3),
        **{corpus: summary(rows) for corpus, rows in corpora.items()},
        "all": {key: value for key, value in summary(every_clip).items() if key != "clips"},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
