"""MIDI transcription of a track: the notes it plays (polyphonic), as a standard MIDI file.

Spotify's basic-pitch on the CPU, called with an array rather than a path; notes only, one piano track
(docs/ARCHITECTURE.md, "Transcription"). Importing this module takes ~2 s (librosa, mir_eval): import
it where a transcription is made.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pretty_midi

from ..core.audio import Audio, load_clip, resample
from ..core.errors import EmptyAudio, NotAudio


@contextmanager
def _root_logger_silenced() -> Iterator[None]:
    """basic_pitch logs one warning per backend it lacks (TensorFlow, CoreML, TFLite) on import, through
    the root logger; and logging.warning() on a root logger without handlers installs a stderr handler
    for the whole process. A NullHandler keeps root unconfigured, and the filter drops those records."""
    root = logging.getLogger()
    handler = logging.NullHandler()

    def drop(record: logging.LogRecord) -> bool:
        return False

    root.addHandler(handler)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        root.removeHandler(handler)


with _root_logger_silenced():
    import basic_pitch
    from basic_pitch import note_creation
    from basic_pitch.constants import AUDIO_N_SAMPLES, AUDIO_SAMPLE_RATE, FFT_HOP
    from basic_pitch.inference import Model, unwrap_output, window_audio_file

MODEL_PATH = basic_pitch.build_icassp_2022_model_path(basic_pitch.FilenameSuffix.onnx)
# basic_pitch.inference.run_inference's windowing: windows overlap by 30 model frames, and half the
# overlap is cut from each side of every window's output.
OVERLAP_FRAMES = 30
OVERLAP_SAMPLES = OVERLAP_FRAMES * FFT_HOP
# basic_pitch.inference.predict's defaults (its command line's too).
ONSET_THRESHOLD = 0.5
FRAME_THRESHOLD = 0.3
MIN_NOTE_SECONDS = 0.1277
MIN_NOTE_FRAMES = round(MIN_NOTE_SECONDS * AUDIO_SAMPLE_RATE / FFT_HOP)
# transcribe_file's default length limit: ten minutes of audio take ~15 s on two idle cores.
DEFAULT_MAX_SECONDS = 600.0
MIDI_PROGRAM = 0  # General MIDI Acoustic Grand Piano


@dataclass(frozen=True)
class Note:
    start: float  # seconds
    end: float  # seconds
    pitch: int  # MIDI note number, 21 (A0) to 108 (C8)
    velocity: int  # 1-127, from the model's mean activation over the note


@dataclass(frozen=True)
class Transcription:
    notes: tuple[Note, ...]  # by start time, then pitch; empty when the audio holds no note
    duration: float  # seconds of audio transcribed

    def midi_bytes(self) -> bytes:
        """A standard MIDI file (type 1, 120 BPM): a tempo track and one piano track with the notes."""
        midi = pretty_midi.PrettyMIDI(initial_tempo=120.0)
        piano = pretty_midi.Instrument(program=MIDI_PROGRAM, name="Transcription")
        piano.notes = [
            pretty_midi.Note(velocity=n.velocity, pitch=n.pitch, start=n.start, end=n.end) for n in self.notes
        ]
        midi.instruments.append(piano)
        buffer = io.BytesIO()
        midi.write(buffer)
        return buffer.getvalue()


@functools.cache
def load_model() -> Model:
    """basic-pitch's ONNX model on onnxruntime's CPU provider, loaded once per process (thread-safe to run)."""
    return Model(MODEL_PATH)


def transcribe(audio: Audio) -> Transcription:
    """The notes of `audio` (any sample rate). Silence and noise give few or no notes, never an error."""
    if len(audio.samples) == 0:
        raise EmptyAudio("The audio is empty (0 samples); there is nothing to transcribe.")
    if not np.isfinite(audio.samples).all():
        raise NotAudio("The audio contains invalid samples (NaN or infinity).")
    if audio.duration < MIN_NOTE_SECONDS:  # too short to hold one note, and to give the decoder a frame
        return Transcription((), audio.duration)
    samples = resample(audio, AUDIO_SAMPLE_RATE).samples
    padded = np.concatenate([np.zeros(OVERLAP_SAMPLES // 2, np.float32), samples])
    model = load_model()
    outputs: dict[str, list[np.ndarray]] = {"note": [], "onset": [], "contour": []}
    for window, _ in window_audio_file(padded, AUDIO_N_SAMPLES - OVERLAP_SAMPLES):
        for name, activations in model.predict(window[np.newaxis]).items():
            outputs[name].append(activations)
    activations = {
        name: unwrap_output(np.concatenate(batches), len(samples), OVERLAP_FRAMES) for name, batches in outputs.items()
    }
    # basic-pitch rescales inferred onsets by their maximum, which is 0 (0/0) when nothing changes.
    with np.errstate(invalid="ignore", divide="ignore"):
        _, events = note_creation.model_output_to_notes(
            activations,
            onset_thresh=ONSET_THRESHOLD,
            frame_thresh=FRAME_THRESHOLD,
            min_note_len=MIN_NOTE_FRAMES,
            include_pitch_bends=False,
        )
    # Velocity from the mean activation as basic-pitch writes it, but never 0: that is a note-off in MIDI.
    notes = [
        Note(float(start), float(end), int(pitch), int(np.clip(round(127 * float(amplitude)), 1, 127)))
        for start, end, pitch, amplitude, _ in events
    ]
    return Transcription(tuple(sorted(notes, key=lambda n: (n.start, n.pitch))), audio.duration)


def transcribe_file(path: str | Path, *, max_seconds: float = DEFAULT_MAX_SECONDS) -> Transcription:
    """Transcribe a WAV, FLAC, OGG or MP3 file, validated like an upload (mtm_bot.core.audio.load_clip):
    a broken, empty, digitally silent or longer than `max_seconds` file raises an AudioError."""
    return transcribe(load_clip(path, min_seconds=0.0, max_seconds=max_seconds))
