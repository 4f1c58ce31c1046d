"""The whole Music -> Text -> Music pipeline: caption, refine, generate. Models load once and stay resident.

Without a clip the LLM writes one caption per output block from the instruction alone and MusicGen
generates without a melody; a picture's one-sentence description (the image captioner's) joins the
LLM's data either way.

The model stages (torch, transformers, xgrammar) are imported when first loaded, so validating a clip
or a duration answers a user in a fraction of a second, before any model library is touched.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.audio import Audio, load_clip, loudness_gain
from ..core.errors import InputError
from ..core.progress import CancelToken, Progress, ProgressCallback, ignore_progress
from ..core.seeds import choose_seed
from ..core.settings import Settings
from ..core.timecode import format_range, format_time, parse_time
from .checkpoints import ALL_STAGES, Stage, check_cached
from .model_thread import ModelThread

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from .captioner import Captioner, Segment
    from .compiling import CompilePlan
    from .generator import Block, Generator
    from .image_captioner import ImageCaptioner
    from .kept import Kept
    from .refiner import Refiner
    from .refiner_prompt import Refinement
    from .transcribe import Transcription

BLOCK_SECONDS = 10  # MusicGen renders the track in blocks this long (the generator's KV cache is sized to one)
SECONDS_WITHOUT_CLIP = 30  # the default length of a track made from words (and a picture) alone


def caption_lines(blocks: list[Block], refinement: Refinement) -> list[str]:
    """One line per output block: `0:00–0:10 caption`."""
    return [f"{format_range(b.start, b.end)} {refinement.segments[b.segment].caption}" for b in blocks]


@dataclass
class ComposeResult:
    segments: list[Segment]  # captions of the input clip; empty for a track made without a clip
    refinement: Refinement  # the LLM's schema-valid JSON, parsed
    blocks: list[Block]  # one per output block, each with its MusicGen description
    audio: Audio  # the generated track, 32 kHz (stereo from a stereo checkpoint), loudness-normalised, exact duration
    seed: int
    codes: torch.Tensor  # (1, K, frames): every code `audio` was decoded from
    gain: float  # the loudness gain applied to the generator's output (of the newest part, for a continuation)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    picture: str | None = None  # the image captioner's description of the user's picture, if one was given
    more_takes: list[ComposeResult] = field(default_factory=list)  # compose(takes=N): takes 2..N

    def caption_lines(self) -> list[str]:
        """One line per output block: `0:00–0:10 caption`."""
        return caption_lines(self.blocks, self.refinement)

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "gain": self.gain,
            "picture": self.picture,
            "duration": self.audio.duration,
            "sample_rate": self.audio.sample_rate,
            "input_captions": [dataclasses.asdict(s) for s in self.segments],
            "refined": self.refinement.to_json(),
            "blocks": [
                {
                    "start": b.start,
                    "end": b.end,
                    "range": format_range(b.start, b.end),
                    "segment": b.segment,
                    "caption": self.refinement.segments[b.segment].caption,
                    "description": b.description,
                }
                for b in self.blocks
            ],
            "timings": self.timings,
        }

    def kept(self, instruction: str, clip: Audio | None) -> Kept:
        """What the next job (Reroll, Extend, Remix, Redo) starts from."""
        from .generator import Rendered
        from .kept import Kept

        return Kept(
            instruction,
            self.segments,
            self.refinement,
            self.blocks,
            self.seed,
            self.gain,
            Rendered(self.audio, self.codes),
            self.picture,
            clip,
        )


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        captioner: Captioner | None = None,
        refiner: Refiner | None = None,
        generator: Generator | None = None,
        image_captioner: ImageCaptioner | None = None,
    ) -> None:
        """Stages not given are loaded from `settings` on first use (or all at once by `load`)."""
        self.settings = settings
        self._device: torch.device | None = None
        self._captioner = captioner
        self._refiner = refiner
        self._generator = generator
        self._image_captioner = image_captioner
        # Several jobs run at once: their MusicGen blocks share decode loops and their clips are captioned
        # in one batch (mtm_bot.stages.batcher); the LLM and the image captioner keep per-call state (static
        # caches), so each takes one job at a time, on a thread of its own where it was loaded and its
        # compiled step captured. Other jobs' blocks decode meanwhile.
        self._refiner_thread = ModelThread("mtm-refiner")
        self._image_captioner_thread = ModelThread("mtm-image")

    def load(self) -> Pipeline:
        """Load all five models now (at start-up), not on a user's first request."""
        self.check_weights()
        _ = self.captioner, self.refiner, self.generator, self.image_captioner
        from .transcribe import load_model

        load_model()  # the transcriber (MIDI) ships in its package: nothing to check or download
        return self

    def check_weights(self, stages: Iterable[Stage] = ALL_STAGES) -> None:
        """With the full profile and nothing to download from, name every missing checkpoint of the stages
        about to load now, in about a second, before any model library is imported (ModelUnavailable)."""
        check_cached(self.settings, stages)

    @property
    def device(self) -> torch.device:
        if self._device is None:
            from .runtime import resolve_device

            self._device = resolve_device(self.settings.device)
        return self._device

    @property
    def compile_plan(self) -> CompilePlan:
        from .compiling import CompilePlan

        return CompilePlan.from_setting(self.settings.compile, self.device)

    @property
    def captioner(self) -> Captioner:
        if self._captioner is None:
            from .captioner import Captioner

            self._captioner = Captioner.load(self.settings.profile, self.device, max_batch=self.settings.max_batch)
        return self._captioner

    @property
    def refiner(self) -> Refiner:
        if self._refiner is None:
            from .captioner import SEGMENT_SECONDS
            from .refiner import Refiner

            # Reply grammars are prepared at load for every part count a request can need: the clip's
            # segments, or without a clip the output blocks.
            max_parts = max(
                math.ceil(self.settings.max_clip_seconds / SEGMENT_SECONDS),
                math.ceil(self.settings.max_output_seconds / BLOCK_SECONDS),
            )
            self._refiner = self._refiner_thread.run(
                lambda: Refiner.load(
                    self.settings.profile,
                    self.settings.llm_id,
                    self.device,
                    compile=self.compile_plan,
                    max_segments=max_parts,
                )
            )
        return self._refiner

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            from .generator import Generator

            self._generator = Generator.load(
                self.settings.profile,
                self.settings.musicgen_id,
                self.device,
                BLOCK_SECONDS,
                compile=self.compile_plan,
                max_batch=self.settings.max_batch,
            )
        return self._generator

    @property
    def image_captioner(self) -> ImageCaptioner:
        if self._image_captioner is None:
            from .image_captioner import ImageCaptioner

            self._image_captioner = self._image_captioner_thread.run(
                lambda: ImageCaptioner.load(self.settings.profile, self.settings.image_captioner_id, self.device)
            )
        return self._image_captioner

    def transcribe(self, track: str | Path) -> Transcription:
        """The notes of a track (the MIDI button; `midi`): basic-pitch on the CPU."""
        from .transcribe import transcribe_file

        return transcribe_file(track)

    def read_image(self, path: str | Path) -> Image:
        """Decode and validate an uploaded picture against the configured limits (typed ImageErrors)."""
        from .image_captioner import read_image

        return read_image(path, max_bytes=self.settings.max_upload_bytes, max_pixels=self.settings.max_image_pixels)

    def describe_image(self, path: str | Path) -> str:
        """One sentence about the picture at `path` (/compose's image; /library image:)."""
        picture = self.read_image(path)
        image_captioner = self.image_captioner
        return self._image_captioner_thread.run(lambda: image_captioner.describe(picture))

    def read_clip(self, path: str | Path) -> Audio:
        """Decode and validate an uploaded clip against the configured limits (typed errors)."""
        s = self.settings
        return load_clip(
            path, min_seconds=s.min_clip_seconds, max_seconds=s.max_clip_seconds, max_bytes=s.max_upload_bytes
        )

    def output_duration(self, clip: Audio | None, requested: int | None) -> int:
        """The requested length, else the clip's length rounded up to whole blocks (SECONDS_WITHOUT_CLIP
        without a clip); within the limits."""
        if requested is None:
            if clip is None:
                return min(SECONDS_WITHOUT_CLIP, self.settings.max_output_seconds)
            blocks = -(-clip.duration // BLOCK_SECONDS)
            return int(min(max(blocks, 1) * BLOCK_SECONDS, self.settings.max_output_seconds))
        if not BLOCK_SECONDS <= requested <= self.settings.max_output_seconds:
            raise InputError(
                f"duration must be between {BLOCK_SECONDS} and {self.settings.max_output_seconds} seconds."
            )
        return int(requested)

    def caption(
        self, clip: Audio, progress: ProgressCallback = ignore_progress, cancel: CancelToken | None = None
    ) -> list[Segment]:
        progress(Progress("captioning"))
        return self.captioner.caption(clip, cancel=cancel)  # with the clips of other jobs captioning now

    def compose(
        self,
        clip: Audio | None,
        instruction: str,
        duration: int | None = None,
        seed: int | None = None,
        progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
        on_captions: Callable[[list[str]], None] | None = None,
        image: str | Path | None = None,
        takes: int = 1,
    ) -> ComposeResult:
        """A new track from a clip (its melody and captions), from words alone (`clip` None), and/or from
        a picture at `image`; with `takes` > 1, that many tracks of the same captions with seeds seed,
        seed + 1, …, generated at once so their blocks share the batched decode (`more_takes`). `on_captions` gets the refined caption lines as soon as they exist, before
        generation starts."""
        cancel = cancel or CancelToken()
        seconds = self.output_duration(clip, duration)
        if seed is None:
            seed = choose_seed(self.settings.seed)
        timings: dict[str, float] = {}

        picture = None
        if image is not None:
            progress(Progress("describing the picture"))
            t0 = time.perf_counter()
            picture = self.describe_image(image)
            timings["describe_image"] = time.perf_counter() - t0
            cancel.check()

        segments: list[Segment] = []
        t0 = time.perf_counter()
        if clip is not None:
            segments = self.caption(clip, progress, cancel)
            timings["caption"] = time.perf_counter() - t0
            cancel.check()
            progress(Progress("refining"))
            t0 = time.perf_counter()
            refinement = self._refine(
                lambda refiner: refiner.refine(segments, instruction, cancel=cancel, seed=seed, picture=picture), cancel
            )
        else:
            progress(Progress("writing the captions from your words"))
            refinement = self._refine(
                lambda refiner: refiner.write(
                    output_ranges(seconds), instruction, cancel=cancel, seed=seed, picture=picture
                ),
                cancel,
            )
        timings["refine"] = time.perf_counter() - t0

        from .generator import plan_blocks

        # Block i follows part i (cycling): the clip's segments, or without a clip the blocks themselves.
        blocks = plan_blocks(seconds, _parts(refinement), BLOCK_SECONDS)
        if takes == 1:
            return self._generate(
                clip, segments, refinement, blocks, seed, progress, cancel, on_captions, timings, picture
            )
        # One thread per take: their MusicGen blocks meet in the generator's decode loops (stages.batcher).
        # Take 1 reports progress and the captions; a cancel stops every take at its next step.
        with ThreadPoolExecutor(max_workers=takes, thread_name_prefix="mtm-take") as pool:
            running = [
                pool.submit(
                    self._generate,
                    clip,
                    segments,
                    refinement,
                    blocks,
                    (seed + take) % 2**31,
                    progress if take == 0 else ignore_progress,
                    cancel,
                    on_captions if take == 0 else None,
                    dict(timings),
                    picture,
                )
                for take in range(takes)
            ]
            first, *more = [take.result() for take in running]
        first.more_takes = more
        return first

    # Starting from a kept track (mtm_bot.stages.kept): each skips what it can reuse -------------------------

    def reroll(
        self,
        kept: Kept,
        seed: int,
        progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
        on_captions: Callable[[list[str]], None] | None = None,
    ) -> ComposeResult:
        """Another take: the same captions and plan, a new seed. No captioning, no LLM."""
        return self._from_kept(kept, kept.refinement, kept.blocks, seed, progress, cancel, on_captions)

    def remix(
        self,
        kept: Kept,
        instruction: str,
        seed: int,
        progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
        on_captions: Callable[[list[str]], None] | None = None,
    ) -> ComposeResult:
        """The same clip (its stored captions: no captioning) and length in another style: the LLM and
        MusicGen run again with `instruction`."""
        cancel = cancel or CancelToken()
        progress(Progress("refining"))
        t0 = time.perf_counter()
        blocks = kept.blocks
        if kept.segments:
            refinement = self._refine(
                lambda refiner: refiner.refine(
                    kept.segments, instruction, cancel=cancel, seed=seed, picture=kept.picture
                ),
                cancel,
            )
            # An edited track has a caption per block: its blocks follow the clip's segments again.
            segment_of = {(s.start, s.end): i for i, s in enumerate(refinement.segments)}
            blocks = [dataclasses.replace(b, segment=segment_of[(b.melody_start, b.melody_end)]) for b in blocks]
        else:
            refinement = self._refine(
                lambda refiner: refiner.write(
                    _parts(kept.refinement), instruction, cancel=cancel, seed=seed, picture=kept.picture
                ),
                cancel,
            )
        timings = {"refine": time.perf_counter() - t0}
        return self._from_kept(kept, refinement, blocks, seed, progress, cancel, on_captions, timings)

    def edit(
        self,
        kept: Kept,
        captions: Sequence[str],
        seed: int,
        progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
        on_captions: Callable[[list[str]], None] | None = None,
    ) -> ComposeResult:
        """The same plan with captions written by hand, one per block (parse_edited_captions), and a new
        seed. No captioning, no LLM: the refinement's style, mood, tempo and instruments stay."""
        if len(captions) != len(kept.blocks):
            raise InputError(
                f"This track has {len(kept.blocks)} blocks; give one caption per block, not {len(captions)}."
            )
        from .refiner_prompt import RefinedSegment

        # A part per block, over the melody that block follows, so blocks that shared a part (a clip shorter
        # than the track) can differ and an Extend keeps cycling through the edited captions.
        parts = tuple(
            RefinedSegment(b.melody_start, b.melody_end, caption) for b, caption in zip(kept.blocks, captions)
        )
        refinement = dataclasses.replace(kept.refinement, segments=parts)
        blocks = [dataclasses.replace(b, segment=i) for i, b in enumerate(kept.blocks)]
        return self._from_kept(kept, refinement, blocks, seed, progress, cancel, on_captions)

    def extend(
        self,
        kept: Kept,
        seconds: int,
        seed: int,
        progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
        on_captions: Callable[[list[str]], None] | None = None,
    ) -> ComposeResult:
        """`seconds` more music after the end: the kept codes prompt it, the captions and the melody keep
        cycling, and the kept track stays sample for sample (at its loudness gain) up to the seam."""
        from .generator import plan_blocks

        end = kept.duration
        check_extension(end, seconds, self.settings.max_output_seconds)
        self._check_continuable(kept, "extended")
        blocks = plan_blocks(
            end + seconds, _parts(kept.refinement), BLOCK_SECONDS, start=end, first_index=len(kept.blocks)
        )
        return self._from_kept(kept, kept.refinement, blocks, seed, progress, cancel, on_captions, continuing=True)

    def redo(
        self,
        kept: Kept,
        from_seconds: float,
        seed: int,
        progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
        on_captions: Callable[[list[str]], None] | None = None,
    ) -> ComposeResult:
        """Keep everything before the block starting at `from_seconds` (its codes and samples) and
        generate the rest again with a new seed: a better ending, a new middle."""
        starts = [b.start for b in kept.blocks[1:]]
        if from_seconds not in starts:
            raise InputError(
                f"{format_time(from_seconds)} is not where a later block of this track starts; "
                f"pick one of {', '.join(format_time(t) for t in starts) or 'none (one block)'}."
            )
        self._check_continuable(kept, "redone from a block")
        blocks = [b for b in kept.blocks if b.start >= from_seconds]
        return self._from_kept(kept, kept.refinement, blocks, seed, progress, cancel, on_captions, continuing=True)

    def _check_continuable(self, kept: Kept, what: str) -> None:
        """Extend and Redo continue the kept codes: only a model with the same channels can (MTM_MUSICGEN_ID
        may have changed since the track was made)."""
        made, now = kept.rendered.audio.channels, self.generator.channels
        if made != now:
            names = {1: "mono", 2: "stereo"}
            raise InputError(
                f"This track was made in {names[made]}, and this server now makes {names[now]} "
                f"tracks, so it cannot be {what}. Reroll or Remix make a new {names[now]} take of it."
            )

    def _refine(self, call: Callable[[Refiner], Refinement], cancel: CancelToken) -> Refinement:
        """Run `call` with the LLM on its own thread, after any other job's refinement."""
        refiner = self.refiner
        return self._refiner_thread.run(lambda: call(refiner), cancel)

    def _from_kept(
        self,
        kept: Kept,
        refinement: Refinement,
        blocks: list[Block],
        seed: int,
        progress: ProgressCallback,
        cancel: CancelToken | None,
        on_captions: Callable[[list[str]], None] | None,
        timings: dict[str, float] | None = None,
        continuing: bool = False,
    ) -> ComposeResult:
        """A new track from a kept one's clip, segments and picture; `continuing`: after the kept codes (Extend,
        Redo) rather than from scratch (Reroll, Remix, Edit)."""
        return self._generate(
            kept.clip,
            kept.segments,
            refinement,
            blocks,
            seed,
            progress,
            cancel,
            on_captions,
            {} if timings is None else timings,
            kept.picture,
            start=kept if continuing else None,
        )

    def _generate(
        self,
        clip: Audio | None,
        segments: list[Segment],
        refinement: Refinement,
        blocks: list[Block],
        seed: int,
        progress: ProgressCallback,
        cancel: CancelToken | None,
        on_captions: Callable[[list[str]], None] | None,
        timings: dict[str, float],
        picture: str | None,
        start: Kept | None = None,
    ) -> ComposeResult:
        """MusicGen over `blocks` (their descriptions from `refinement`), from scratch or continuing the
        kept track `start` cut where the first block begins; the result holds every block of the track."""
        blocks = [dataclasses.replace(b, description=refinement.description(b.segment)) for b in blocks]
        kept_blocks = [] if start is None else [b for b in start.blocks if b.start < blocks[0].start]
        if on_captions is not None:
            on_captions(caption_lines(kept_blocks + blocks, refinement))
        t0 = time.perf_counter()
        if start is None:
            rendered = self.generator.generate(clip, blocks, seed=seed, progress=progress, cancel=cancel)
            gain = loudness_gain(rendered.audio)
            audio = Audio(rendered.audio.samples * np.float32(gain), rendered.audio.sample_rate)
        else:
            # The kept part was delivered at its own gain; the new part follows at the same level (lower
            # only where that would clip it), and a further continuation at the new part's.
            rendered = self.generator.generate(
                clip,
                blocks,
                seed=seed,
                progress=progress,
                cancel=cancel,
                start=start.rendered.until(blocks[0].start),
                gain=start.gain,
            )
            audio, gain = rendered.audio, rendered.gain
        timings["generate"] = time.perf_counter() - t0
        return ComposeResult(
            segments, refinement, kept_blocks + blocks, audio, seed, rendered.codes, gain, timings, picture
        )


MIN_EXTEND_SECONDS, MAX_EXTEND_SECONDS = 10, 60


def check_extension(length: float, seconds: int, max_output_seconds: int) -> None:
    """Refuse (InputError) an extension of a `length`-second track by `seconds` that Extend cannot make;
    the bot asks before queueing the job, the pipeline again before generating."""
    if not MIN_EXTEND_SECONDS <= seconds <= MAX_EXTEND_SECONDS:
        raise InputError(
            f"A track can be extended by {MIN_EXTEND_SECONDS} to {MAX_EXTEND_SECONDS} seconds, not {seconds}."
        )
    if length + seconds > max_output_seconds:
        raise InputError(
            f"This track is {length:.0f} s long; with {seconds} s more it would pass the {max_output_seconds} s limit."
        )


_CAPTION_LINE = re.compile(
    r"(?P<start>[0-9]+:[0-5][0-9])\s*[\u2013-]\s*(?P<end>[0-9]+:[0-5][0-9])(?:\s+(?P<caption>.*))?"
)


def parse_edited_captions(text: str, ranges: Sequence[tuple[float, float]]) -> list[str]:
    """The captions of `M:SS–M:SS caption` lines, one per block of a track whose blocks span `ranges`, in
    order (Edit captions; `edit --captions`). InputError says what to fix: a line that does not parse, a
    wrong number of lines, a time range that is not the block's, an empty caption."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    matches = [_CAPTION_LINE.fullmatch(line) for line in lines]
    for number, (line, match) in enumerate(zip(lines, matches), 1):
        if match is None:
            raise InputError(
                f"Line {number} ({line[:40]!r}) does not start with a time range; write each line "
                "as `M:SS–M:SS caption`."
            )
    if len(lines) != len(ranges):
        raise InputError(
            f"This track has {len(ranges)} blocks, so write {len(ranges)} lines, one per block; you wrote {len(lines)}."
        )
    captions = []
    for number, (match, (start, end)) in enumerate(zip(matches, ranges), 1):
        assert match is not None  # every line matched above
        written, block = format_range(parse_time(match["start"]), parse_time(match["end"])), format_range(start, end)
        if written != block:
            raise InputError(
                f"Line {number} says {written}, but block {number} of this track is {block}; "
                "keep the time ranges as they are and change only the captions."
            )
        caption = (match["caption"] or "").strip()
        if not caption:
            raise InputError(f"Line {number} ({block}) has no caption; describe that part of the track.")
        captions.append(caption)
    return captions


def _parts(refinement: Refinement) -> list[tuple[float, float]]:
    """The time ranges the refined captions belong to: the clip's segments, or the output blocks."""
    return [(s.start, s.end) for s in refinement.segments]


def output_ranges(seconds: int) -> list[tuple[float, float]]:
    """The output blocks' time ranges: whole BLOCK_SECONDS blocks, the last possibly shorter."""
    return [(float(start), float(min(start + BLOCK_SECONDS, seconds))) for start in range(0, seconds, BLOCK_SECONDS)]
