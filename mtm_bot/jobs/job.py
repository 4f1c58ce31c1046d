"""A job: one request for GPU work (a /compose, a /caption, a click under a result), its kind and its state.

A compose job without a clip (input_path None) is made from its instruction (and picture) alone. A job
derived from a finished track (Reroll, Extend, Remix, Redo, MIDI, Edit captions) names that track as its `parent_id`.
What each kind runs, reads, writes and shows is declared once, in mtm_bot.jobs.kinds.

A finished job carries `result_json` with a "lines" list: one `M:SS–M:SS caption` line per output
block (compose) or per input segment (caption), ready to post; jobs that make a track also carry
`result_path` (16-bit WAV) and the full ComposeResult.to_json() fields.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


UNFINISHED = (JobState.QUEUED, JobState.RUNNING)
TERMINAL = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobKind(StrEnum):
    COMPOSE = "compose"
    CAPTION = "caption"
    LIBRARY_IMAGE = "library_image"  # /library image: the worker describes the picture, delivery searches with it
    # Derived from a finished track (its parent), by the buttons under it:
    REROLL = "reroll"  # the same captions, a new seed
    EXTEND = "extend"  # `duration` seconds more after the end
    REMIX = "remix"  # the stored input captions refined with a new instruction
    REDO = "redo"  # everything from the block at `redo_from` seconds generated again
    MIDI = "midi"  # the track's notes as a MIDI file
    EDIT = "edit"  # the same plan with the captions the user wrote (`captions`), a new seed


@dataclass
class Job:
    id: str  # 8 hex characters; what /cancel takes
    kind: JobKind
    user_id: int
    guild_id: int | None
    channel_id: int
    instruction: str  # "" for caption jobs
    duration: int | None  # seconds of music the job generates; None = the clip's length rounded up to whole blocks
    attachment_size_limit: int  # the interaction's upload limit, kept for delivery after a restart
    application_id: int
    interaction_token: str
    created_at: float  # Unix time
    input_path: Path | None = None
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None  # the user-facing message of a failed job
    seed: int | None = None  # chosen and stored before the first run, so a resumed job sounds the same
    resumed: bool = False  # ran again after a restart
    delivered: bool = False  # the listener has posted the outcome
    result_path: Path | None = None
    result_json: dict | None = None
    image_path: Path | None = None  # a compose job's picture (stored like the clip)
    parent_id: str | None = None  # a derived job's parent: the finished track it builds on
    redo_from: int | None = None  # a redo: the output second the regenerated part starts at
    captions: list[str] | None = None  # an edit: the user's caption per block of the parent's track
    attempt: int = 0  # times handed to a GPU worker (distributed mode): a result of an older attempt is stale
    takes: int = 1  # compose: tracks made from the same refined captions, each its own result (take_id)

    @classmethod
    def new(
        cls,
        kind: JobKind | str,
        *,
        user_id: int,
        guild_id: int | None,
        channel_id: int,
        instruction: str = "",
        duration: int | None = None,
        attachment_size_limit: int,
        application_id: int,
        interaction_token: str,
        parent_id: str | None = None,
        redo_from: int | None = None,
        captions: list[str] | None = None,
        takes: int = 1,
    ) -> Job:
        return cls(
            secrets.token_hex(4),
            JobKind(kind),
            user_id,
            guild_id,
            channel_id,
            instruction,
            duration,
            attachment_size_limit,
            application_id,
            interaction_token,
            created_at=time.time(),
            parent_id=parent_id,
            redo_from=redo_from,
            captions=captions,
            takes=takes,
        )

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


def take_id(job_id: str, take: int) -> str:
    """The job id of a compose job's take 2, 3, …: its own result, controls and files (take 1 is the job
    itself). Derived from the job's id, so a job that runs again after a restart names its takes the same."""
    return hashlib.blake2b(f"{job_id}:take{take}".encode(), digest_size=4).hexdigest()
