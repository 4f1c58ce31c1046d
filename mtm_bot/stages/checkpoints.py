"""The hub checkpoints each model stage's full profile loads, named without importing any model library.

So a run without the weights (and without a hub to fetch them from) names every missing one in a second,
instead of after torch and transformers have been imported, and asks only for the stages the command
at hand loads: `caption` needs neither the LLM nor MusicGen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

from ..core.settings import Settings

LP_MUSICCAPS_REPO = "seungheondoh/lp-music-caps"
LP_MUSICCAPS_FILE = "transfer.pth"
BART_REPO = "facebook/bart-base"  # LP-MusicCaps' decoder config and tokenizer

Stage = Literal["captioner", "refiner", "generator", "image_captioner"]  # as the Pipeline names them
Checkpoint = tuple[str, str]  # (hub repo id or local directory, a file it must hold)

# The one place each stage names what it loads. The transcriber (MIDI) ships its model in its package.
STAGE_CHECKPOINTS: dict[Stage, Callable[[Settings], list[Checkpoint]]] = {
    "captioner": lambda settings: [(LP_MUSICCAPS_REPO, LP_MUSICCAPS_FILE), (BART_REPO, "config.json")],
    "refiner": lambda settings: [(settings.llm_id, "config.json")],
    "generator": lambda settings: [(settings.musicgen_id, "config.json")],
    "image_captioner": lambda settings: [(settings.image_captioner_id, "config.json")],
}
ALL_STAGES: tuple[Stage, ...] = tuple(STAGE_CHECKPOINTS)


def checkpoints(settings: Settings, stages: Iterable[Stage] = ALL_STAGES) -> list[Checkpoint]:
    """Every checkpoint the full profile of these stages loads, in stage order."""
    return [checkpoint for stage in stages for checkpoint in STAGE_CHECKPOINTS[stage](settings)]


def check_cached(settings: Settings, stages: Iterable[Stage] = ALL_STAGES) -> None:
    """Raise ModelUnavailable naming every missing checkpoint of `stages` when the full profile must load
    from the cache alone (HF_HUB_OFFLINE, or a hub that does not answer); with a hub, loading downloads them."""
    if settings.profile != "full":
        return
    from huggingface_hub import constants

    from .hub import missing_from_cache, offline_because, weights_missing

    why = offline_because()  # asks the hub once per process; offline, it switches huggingface_hub offline
    if not constants.is_offline_mode():
        return
    missing = missing_from_cache(checkpoints(settings, stages))
    if missing:
        raise weights_missing(missing, why or "HF_HUB_OFFLINE is set")
