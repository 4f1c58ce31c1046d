"""The hub checkpoints the full profile loads, named without importing any model library.

So a first run without the weights (and without a hub to fetch them from) names every missing one in
a second, instead of after torch and transformers have been imported.
"""
from __future__ import annotations

from .settings import Settings

LP_MUSICCAPS_REPO = "seungheondoh/lp-music-caps"
LP_MUSICCAPS_FILE = "transfer.pth"
BART_REPO = "facebook/bart-base"  # LP-MusicCaps' decoder config and tokenizer


def full_profile_files(settings: Settings) -> list[tuple[str, str]]:
    """(repo, a file it must hold) for every checkpoint the full profile loads."""
    return [(LP_MUSICCAPS_REPO, LP_MUSICCAPS_FILE), (BART_REPO, "config.json"), (settings.llm_id, "config.json"),
            (settings.musicgen_id, "config.json"), (settings.image_captioner_id, "config.json")]


def check_cached(settings: Settings) -> None:
    """Raise ModelUnavailable naming every missing checkpoint when the full profile must load from the
    cache alone (HF_HUB_OFFLINE, or a hub that does not answer); with a hub, loading downloads them."""
    if settings.profile != "full":
        return
    from huggingface_hub import constants

    from .hub import missing_from_cache, offline_because, weights_missing

    why = offline_because()  # asks the hub once per process; offline, it switches huggingface_hub offline
    if not constants.is_offline_mode():
        return
    missing = missing_from_cache(full_profile_files(settings))
    if missing:
        raise weights_missing(missing, why or "HF_HUB_OFFLINE is set")
