"""music21 scores rendered to audio by FluidSynth with a General MIDI soundfont, for the benchmarks.

Extra installs (the benchmarks only; the bot and its tests need none of them):

    apt-get install fluidsynth fluid-soundfont-gm
    .venv/bin/pip install music21
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

from mtm_bot.core.audio import Audio, resample

SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"


def require_fluidsynth() -> None:
    if shutil.which("fluidsynth") is None or not Path(SOUNDFONT).exists():
        raise SystemExit("needs FluidSynth and a GM soundfont: apt-get install fluidsynth fluid-soundfont-gm")


def render_midi(midi_path: Path, rate: int) -> np.ndarray:
    """FluidSynth's rendering of a MIDI file: mono float32 at `rate`, the whole file and its release tail."""
    wav_path = midi_path.with_suffix(".wav")
    subprocess.run(
        ["fluidsynth", "-ni", "-q", "-g", "0.5", "-r", str(rate), "-F", str(wav_path), SOUNDFONT, str(midi_path)],
        check=True,
        capture_output=True,
    )
    samples, file_rate = sf.read(wav_path, dtype="float32", always_2d=True)
    return resample(Audio(samples.mean(axis=1), file_rate), rate).samples


def render(score, workdir: Path, rate: int) -> np.ndarray:
    """A music21 score written as MIDI to `workdir`/score.mid and rendered by FluidSynth (see render_midi)."""
    midi_path = workdir / "score.mid"
    score.write("midi", fp=midi_path)
    return render_midi(midi_path, rate)
