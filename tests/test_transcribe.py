"""MIDI transcription (mtm_bot/stages/transcribe.py): known notes rendered to audio come back as MIDI notes."""

from __future__ import annotations

import io

import mir_eval
import numpy as np
import pretty_midi
import pytest
from synth import bad_files

from mtm_bot.core.audio import Audio, write
from mtm_bot.core.errors import ClipTooLong, ClipTooShort, EmptyAudio, NotAudio
from mtm_bot.stages.transcribe import (
    MIN_NOTE_SECONDS,
    MODEL_PATH,
    Note,
    Transcription,
    load_model,
    transcribe,
    transcribe_file,
)

RATE = 32000  # not the model's 22.05 kHz, so that resampling is exercised
# (MIDI pitch, start s, end s): a melody across two octaves, then a C major chord under a short tune.
SCORE = [
    (60, 0.5, 1.0),
    (64, 1.0, 1.5),
    (67, 1.5, 2.0),
    (72, 2.0, 2.5),
    (71, 2.5, 3.0),
    (67, 3.0, 3.5),
    (48, 4.0, 5.5),
    (52, 4.0, 5.5),
    (55, 4.0, 5.5),
    (76, 4.5, 5.0),
    (74, 5.0, 5.5),
]
SECONDS = 6.5
ONSET_TOLERANCE = 0.05  # seconds, mir_eval's default and the benchmark's


def render(score: list[tuple[int, float, float]], seconds: float, rate: int = RATE) -> np.ndarray:
    """Plucked harmonic tones (six partials at 1/k^2), peak 0.5."""
    out = np.zeros(int(seconds * rate))
    for pitch, start, end in score:
        t = np.arange(int((end - start) * rate)) / rate
        hz = 440.0 * 2 ** ((pitch - 69) / 12)
        envelope = np.minimum(1, t / 0.005) * np.minimum(1, (end - start - t) / 0.02) * np.exp(-2 * t)
        tone = sum(np.sin(2 * np.pi * k * hz * t) / k**2 for k in range(1, 7))
        first = int(start * rate)
        out[first : first + len(t)] += envelope * tone
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def parse(midi: bytes) -> list[pretty_midi.Note]:
    notes = [n for instrument in pretty_midi.PrettyMIDI(io.BytesIO(midi)).instruments for n in instrument.notes]
    return sorted(notes, key=lambda n: (n.start, n.pitch))


def onset_scores(score: list[tuple[int, float, float]], notes: list[pretty_midi.Note]) -> tuple[float, float]:
    """Note-level precision and recall: same pitch, onset within 50 ms (offsets ignored)."""
    ref_intervals = np.array([(start, end) for _, start, end in score])
    ref_hz = np.array([pretty_midi.note_number_to_hz(pitch) for pitch, _, _ in score])
    est_intervals = np.array([(n.start, n.end) for n in notes]).reshape(-1, 2)
    est_hz = np.array([pretty_midi.note_number_to_hz(n.pitch) for n in notes])
    precision, recall, _, _ = mir_eval.transcription.precision_recall_f1_overlap(
        ref_intervals, ref_hz, est_intervals, est_hz, onset_tolerance=ONSET_TOLERANCE, offset_ratio=None
    )
    return precision, recall


@pytest.fixture(scope="module")
def scored() -> Transcription:
    return transcribe(Audio(render(SCORE, SECONDS), RATE))


def test_the_onnx_model_shipped_with_basic_pitch_is_the_one_loaded():
    model = load_model()
    assert model.model_type.name == "ONNX" and MODEL_PATH.name == "nmp.onnx" and MODEL_PATH.is_file()
    assert load_model() is model  # loaded once


def test_known_notes_come_back_in_the_midi_file(scored):
    notes = parse(scored.midi_bytes())
    precision, recall = onset_scores(SCORE, notes)
    assert recall == 1.0, notes  # every note of the score, at its pitch, within 50 ms of its onset
    # The rest are mostly overtones of the chord's low notes and repeated onsets of held ones.
    assert precision >= 0.6, notes
    assert scored.duration == pytest.approx(SECONDS)


def test_midi_file_holds_the_transcription_notes(scored):
    parsed = parse(scored.midi_bytes())
    assert [(n.pitch, n.velocity) for n in parsed] == [(n.pitch, n.velocity) for n in scored.notes]
    tick = 1 / (2 * 220)  # pretty_midi writes 220 ticks per beat at 120 BPM
    assert np.allclose([(n.start, n.end) for n in parsed], [(n.start, n.end) for n in scored.notes], atol=tick)
    assert all(1 <= n.velocity <= 127 and n.end > n.start for n in scored.notes)


def test_midi_bytes_of_given_notes():
    notes = (Note(0.0, 0.5, 60, 100), Note(0.25, 1.0, 64, 1), Note(1.0, 2.0, 108, 127))
    parsed = parse(Transcription(notes, 2.0).midi_bytes())
    assert [(n.start, n.end, n.pitch, n.velocity) for n in parsed] == [
        (0.0, 0.5, 60, 100),
        (0.25, 1.0, 64, 1),
        (1.0, 2.0, 108, 127),
    ]


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3"])
def test_transcribe_file_reads_every_upload_format(tmp_path, suffix):
    path = tmp_path / f"track{suffix}"
    write(Audio(render(SCORE, SECONDS), RATE), path)
    _, recall = onset_scores(SCORE, parse(transcribe_file(path).midi_bytes()))
    assert recall >= 0.9


@pytest.mark.parametrize(
    "samples",
    [np.zeros(3 * RATE), 1e-3 * np.random.default_rng(0).standard_normal(3 * RATE)],
    ids=["digital silence", "quiet noise"],
)
def test_silence_and_noise_give_a_valid_file_with_few_or_no_notes(samples):
    transcription = transcribe(Audio(samples, RATE))
    assert len(parse(transcription.midi_bytes())) == len(transcription.notes) <= 2


def test_digital_silence_gives_no_notes():
    assert transcribe(Audio(np.zeros(3 * RATE), RATE)).notes == ()


def test_audio_too_short_for_a_note_gives_no_notes(monkeypatch):
    model = load_model()
    predict, runs = model.predict, []
    monkeypatch.setattr(model, "predict", lambda window: (runs.append(len(window)), predict(window))[1])
    for samples in (1, 100, int(MIN_NOTE_SECONDS * RATE) - 1):  # answered before the model runs
        assert transcribe(Audio(render([(69, 0.0, 1.0)], 1.0)[:samples], RATE)).notes == ()
    assert runs == []
    # Through the model and the note decoder: a tone cut just past the shortest note, and a 50 ms blip in a
    # longer clip, are still no note.
    for audio in (render([(69, 0.0, 1.0)], 1.0)[: int(MIN_NOTE_SECONDS * RATE) + 1], render([(69, 0.5, 0.55)], 1.5)):
        runs.clear()
        assert transcribe(Audio(audio, RATE)).notes == () and runs
    # Just long enough for a note; it may or may not count.
    assert len(parse(transcribe(Audio(render([(69, 0.0, 0.2)], 0.2), RATE)).midi_bytes())) <= 1


def test_bad_input_raises_typed_errors(tmp_path):
    with pytest.raises(EmptyAudio):
        transcribe(Audio(np.zeros(0), RATE))
    nan = render([(69, 0.0, 1.0)], 1.0)
    nan[100] = np.nan
    with pytest.raises(NotAudio):
        transcribe(Audio(nan, RATE))
    for path, error in bad_files(tmp_path).values():
        if error is ClipTooShort:  # any length is transcribed; a short one simply holds few notes
            continue
        with pytest.raises(error):
            transcribe_file(path, max_seconds=60)


def test_length_limit(tmp_path):
    path = tmp_path / "track.flac"
    write(Audio(render(SCORE, SECONDS), RATE), path)
    with pytest.raises(ClipTooLong):
        transcribe_file(path, max_seconds=SECONDS - 1)
