"""Is the Hugging Face hub there? Asked once with a short timeout, without importing torch.

huggingface_hub retries a failed connection five times with backoff, about half a minute per file,
before it reports a file missing; with no network, loading the full profile or running `download`
would take minutes to say so.
"""

from __future__ import annotations

import functools
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from ..core.errors import ModelUnavailable

HUB_PROBE_TIMEOUT_S = 3.0


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub (HF_ENDPOINT) cannot be reached, as a phrase for a sentence, or None when it answers."""
    from huggingface_hub import constants

    url = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # any answer, an error status too, means the hub is there
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLError):
            return None  # the network works; huggingface_hub brings its own certificates and may well connect
        return f"the Hugging Face hub at {url} cannot be reached ({_reason(err.reason, timeout)})"
    except OSError as err:  # a timeout or reset after connecting
        return f"the Hugging Face hub at {url} cannot be reached ({_reason(err, timeout)})"
    return None


def _reason(err: object, timeout: float) -> str:
    if isinstance(err, TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(getattr(err, "strerror", None) or err)


@functools.cache
def offline_because() -> str | None:
    """Why hub loads in this process must run offline, if they must; the hub is asked once per process.

    Offline, cached weights load at once and missing ones fail at once.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return None  # HF_HUB_OFFLINE is set: cached files only, as asked, and no probe
    reason = hub_unreachable()
    if reason is not None:
        # is_offline_mode() reads this at every call, and transformers asks it too; the environment
        # variable HF_HUB_OFFLINE is read only when huggingface_hub is imported.
        constants.HF_HUB_OFFLINE = True
    return reason


def missing_from_cache(files: Iterable[tuple[str, str]]) -> list[str]:
    """Of (repo id or local directory, file name) pairs, the repos whose file is not on this machine,
    in order: a check that needs neither the network nor any model library."""
    from huggingface_hub import try_to_load_from_cache

    missing: list[str] = []
    for repo, filename in files:
        if Path(repo).is_dir():
            present = (Path(repo) / filename).is_file()
        else:
            present = isinstance(try_to_load_from_cache(repo, filename), str)
        if not present and repo not in missing:
            missing.append(repo)
    return missing


def weights_missing(repos: Iterable[str], why: str | None) -> ModelUnavailable:
    """The one sentence for checkpoints that are neither cached nor downloadable (`why`: what stopped it)."""
    because = f": {why}" if why else ""
    return ModelUnavailable(
        f"The weights of {', '.join(repos)} are not in the local Hugging Face cache and could not be "
        f"downloaded{because}. Run `python -m mtm_bot download` on a machine with network access "
        f"(gated repos need `huggingface-cli login` and an accepted license)."
    )
