"""Playing kept tracks to a voice or stage channel, the parts that need no Discord: the audio as Discord
voice takes it, and one server's queue of tracks.

Discord voice carries 20 ms Opus frames of 48 kHz stereo audio, and discord.py encodes them from 16-bit
PCM. Our tracks are 32 kHz WAV (mono, or stereo for the stereo checkpoints), so a track is resampled
here with soxr, once per play, and needs no ffmpeg. A queued track holds its samples, read at the
click: a track whose retention ends while it waits still plays.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import InputError

VOICE_RATE = 48_000  # what Discord's Opus frames carry
VOICE_CHANNELS = 2
FRAME_SAMPLES = VOICE_RATE // 50  # 20 ms: discord.py's Opus frame
MAX_WAITING = 10  # tracks queued behind the one playing, per server (each holds its samples in memory)


class QueueFull(InputError):
    pass


@dataclass
class Play:
    """A track someone asked to hear: whose click it was, and where to say that it plays."""

    job_id: str
    requester_id: int
    text_channel_id: int  # where Play was clicked: "now playing" goes there
    samples: np.ndarray  # int16, (frames,) or (frames, channels), as the kept WAV holds them
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


def read_track(path: Path) -> tuple[np.ndarray, int]:
    """A kept WAV's samples as stored (16-bit), and its rate."""
    samples, rate = sf.read(path, dtype="int16")
    return samples, rate


def voice_pcm(samples: np.ndarray, rate: int) -> bytes:
    """48 kHz stereo 16-bit little-endian PCM, padded with silence to whole 20 ms frames (discord.py
    drops a last partial frame)."""
    audio = samples.astype(np.float32) / 32768.0
    if audio.ndim == 1:
        audio = audio[:, None]
    audio = soxr.resample(audio, rate, VOICE_RATE, quality="HQ")
    if audio.shape[1] == 1:
        audio = np.repeat(audio, VOICE_CHANNELS, axis=1)
    frames = -(-len(audio) // FRAME_SAMPLES) * FRAME_SAMPLES
    pcm = np.zeros((frames, VOICE_CHANNELS), dtype="<i2")
    pcm[: len(audio)] = np.clip(np.round(audio * 32767.0), -32768, 32767)
    return pcm.tobytes()


class PlayQueue:
    """One server's tracks: the one playing and those waiting, in click order."""

    def __init__(self, per_user: int, most_waiting: int = MAX_WAITING) -> None:
        self.per_user = per_user
        self.most_waiting = most_waiting
        self.now: Play | None = None
        self.waiting: deque[Play] = deque()

    def add(self, play: Play) -> int:
        """Queue `play`; its place in line (1 = next). Refused over the server's or the user's limit."""
        if len(self.waiting) >= self.most_waiting:
            raise QueueFull(
                f"{len(self.waiting)} tracks are waiting to play here already; "
                "please click Play again once some have played."
            )
        mine = sum(1 for p in (self.now, *self.waiting) if p is not None and p.requester_id == play.requester_id)
        if mine >= self.per_user:
            raise QueueFull(f"You have {mine} tracks playing or waiting here; the limit is {self.per_user} per user.")
        self.waiting.append(play)
        return len(self.waiting)

    def advance(self) -> Play | None:
        """The next track becomes the one playing (None: nothing is left)."""
        self.now = self.waiting.popleft() if self.waiting else None
        return self.now
