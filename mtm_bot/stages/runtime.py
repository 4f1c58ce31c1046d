"""Where models run and where their weights come from: device choice, dtype, hub loading."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from ..core.errors import ModelUnavailable

T = TypeVar("T")


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


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


def cast_for_inference(model: ModuleT, dtype: torch.dtype, keep_fp32: Iterable[str] = ()) -> ModuleT:
    """Cast a float32 model's floating parameters and buffers to `dtype`, in place, except those under a
    submodule named in `keep_fp32` or in the model's own keep-in-fp32 lists, by transformers' rules:
    `_keep_in_fp32_modules` under fp16 only (T5's `wo` overflows there), `_keep_in_fp32_modules_strict`
    under any half precision.

    Load weights in float32 and cast with this, so what stays float32 (EnCodec, a mel front end) never
    passes through half-precision rounding on the way.
    """
    keep = set(keep_fp32) | set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model


def from_hub(repo_id: str, load: Callable[[], T]) -> T:
    """Run a hub loader; turn "not in the cache and no network" into one clear message.

    When the hub cannot be reached, the loader runs in huggingface_hub's offline mode: cached weights
    load at once and missing ones fail at once, instead of after half a minute of retries per file.
    """
    from .hub import offline_because, weights_missing

    why_offline = offline_because()
    try:
        return load()
    except (OSError, ValueError) as err:  # huggingface_hub's offline/missing errors subclass OSError
        if _looks_missing(err, str(err)):
            raise weights_missing([repo_id], why_offline) from err
        raise


def _looks_missing(err: BaseException, text: str) -> bool:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(err, (LocalEntryNotFoundError, GatedRepoError, RepositoryNotFoundError)):
        return True
    cause = err.__cause__ or err.__context__
    if cause is not None and cause is not err and isinstance(cause, Exception):
        if isinstance(cause, (LocalEntryNotFoundError, GatedRepoError, RepositoryNotFoundError)):
            return True
    return (
        "offline" in text.lower() or "couldn't connect" in text.lower() or "not the path to a directory" in text.lower()
    )
