"""What a finished track keeps, so the next job can start from it (Reroll, Extend, Remix, Redo, MIDI).

Three files: the track, a state file (.npz with its codes and, as JSON, what made it; never pickled) and
the clip where there was one (docs/ARCHITECTURE.md, "What a finished track keeps").
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from ..core.audio import Audio
from ..core.audio import write as write_audio
from ..core.errors import InputError

if TYPE_CHECKING:  # the job store names KeptFiles; the bot process needs no model library for that
    from .captioner import Segment
    from .generator import Block, Rendered
    from .refiner_prompt import Refinement

STATE_VERSION = 1


class ResultExpired(InputError):
    """The files a derived job starts from are gone (retention, or deleted by hand)."""


@dataclass(frozen=True)
class KeptFiles:
    track: Path  # the delivered WAV
    state: Path  # codes and the rest (.npz)
    clip: Path | None  # the user's clip, None for a track made without one

    @classmethod
    def in_folder(cls, folder: Path) -> KeptFiles:
        """The CLI's layout: DIR/track.wav, DIR/state.npz, DIR/clip.<ext>."""
        clips = sorted(folder.glob("clip.*"))
        return cls(folder / "track.wav", folder / "state.npz", clips[0] if clips else None)

    def exist(self) -> bool:
        return self.track.is_file() and self.state.is_file() and (self.clip is None or self.clip.is_file())


@dataclass
class Kept:
    instruction: str
    segments: list[Segment]  # the clip's captions; empty for a track made without a clip
    refinement: Refinement
    blocks: list[Block]  # with their MusicGen descriptions
    seed: int
    gain: float  # the loudness gain the generator's output was delivered at
    rendered: Rendered  # the delivered track and its codes
    picture: str | None = None  # the description of the user's picture, if there was one
    clip: Audio | None = None

    @property
    def duration(self) -> float:
        return self.rendered.audio.duration

    def save(self, files: KeptFiles) -> None:
        """Write the track and the state (the clip is stored already: it is the job's upload)."""
        write_audio(self.rendered.audio, files.track)
        meta = {
            "version": STATE_VERSION,
            "instruction": self.instruction,
            "segments": [dataclasses.asdict(s) for s in self.segments],
            "refinement": self.refinement.to_json(),
            "parts": [[s.start, s.end] for s in self.refinement.segments],
            "blocks": [dataclasses.asdict(b) for b in self.blocks],
            "seed": self.seed,
            "gain": self.gain,
            "picture": self.picture,
        }
        codes = self.rendered.codes[0].cpu().numpy().astype(np.int16)  # (K, frames); codebooks hold 2048 codes
        with files.state.open("wb") as out:  # an open file: np.savez would append .npz to a path
            np.savez(out, codes=codes, meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, files: KeptFiles, read_clip: Callable[[Path], Audio]) -> Kept:
        """Read a kept result; ResultExpired if its files are gone."""
        import torch

        from .captioner import Segment
        from .generator import Block, Rendered
        from .refiner_prompt import RefinedSegment, Refinement

        if not files.exist():
            raise ResultExpired("The track this builds on is no longer stored.")
        with np.load(files.state, allow_pickle=False) as state:
            meta = json.loads(str(state["meta"]))
            codes = torch.from_numpy(state["codes"].astype(np.int64))[None]
        if meta.get("version") != STATE_VERSION:
            raise ResultExpired("The track this builds on was kept by an older version and cannot be reused.")
        samples, rate = sf.read(str(files.track), dtype="float32", always_2d=False)
        parts = [RefinedSegment(start, end, "") for start, end in meta["parts"]]
        return cls(
            instruction=meta["instruction"],
            segments=[Segment(**s) for s in meta["segments"]],
            refinement=Refinement.from_json(meta["refinement"], parts),
            blocks=[Block(**b) for b in meta["blocks"]],
            seed=meta["seed"],
            gain=meta["gain"],
            rendered=Rendered(Audio(samples, rate), codes),
            picture=meta["picture"],
            clip=read_clip(files.clip) if files.clip is not None else None,
        )


def keep_clip(clip: Path, folder: Path) -> Path:
    """Copy the user's clip into a CLI folder as clip.<ext> (the extension tells the decoder its format)."""
    target = folder / f"clip{clip.suffix.lower()}"
    shutil.copyfile(clip, target)
    return target
