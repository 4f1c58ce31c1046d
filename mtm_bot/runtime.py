"""Where models run and where their weights come from: device choice, dtype, hub loading."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

from .errors import ModelUnavailable

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """`auto` picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"MTM_DEVICE={name} but no CUDA device is available.")
    return device


def model_dtype(device: torch.device) -> torch.dtype:
    """Half precision on GPUs (bf16 where supported: no fp16 overflow in long decodes), fp32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def from_hub(repo_id: str, load: Callable[[], T]) -> T:
    """Run a hub loader; turn "not in the cache and no network" into one clear message."""
    try:
        return load()
    except (OSError, ValueError) as err:  # huggingface_hub's offline/missing errors subclass OSError
        text = str(err)
        if _looks_missing(err, text):
            raise ModelUnavailable(
                f"The weights of {repo_id} are not in the local Hugging Face cache and could not be "
                f"downloaded. Run `python -m mtm_bot download` on a machine with network access "
                f"(gated repos need `huggingface-cli login` and an accepted license)."
            ) from err
        raise


def _looks_missing(err: BaseException, text: str) -> bool:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(err, (LocalEntryNotFoundError, GatedRepoError, RepositoryNotFoundError)):
        return True
    cause = err.__cause__ or err.__context__
    if cause is not None and cause is not err and isinstance(cause, Exception):
        if isinstance(cause, (LocalEntryNotFoundError, GatedRepoError, RepositoryNotFoundError)):
            return True
    return "offline" in text.lower() or "couldn't connect" in text.lower() or "not the path to a directory" in text.lower()
