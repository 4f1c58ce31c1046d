"""Settings from environment variables, with a `.env` file in the working directory read too.

Real environment variables win over `.env` (a contract: docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from dotenv import dotenv_values

from .errors import InputError

MIB = 1024 * 1024
MAX_TAKES = 4  # /compose takes: 1-4 (Discord enforces the range; the setting is checked here)


class SettingsError(InputError):
    pass


@dataclass(frozen=True)
class Settings:
    discord_token: str | None = field(default=None, repr=False)  # never logged
    discord_api_base: str = "https://discord.com/api/v10"
    discord_gateway_url: str = "wss://gateway.discord.gg/"
    guild_id: int | None = None
    profile: str = "full"  # "full" | "tiny"
    storage_dir: Path = Path("storage")
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    compile: str = "auto"  # "auto" (compile on CUDA, eager if that fails) | "on" | "off"

    # Models (any compatible hub id).
    llm_id: str = "meta-llama/Llama-3.2-3B-Instruct"
    musicgen_id: str = "facebook/musicgen-melody"
    image_captioner_id: str = "Salesforce/blip-image-captioning-base"  # describes /compose's picture

    # Limits a community server can tune.
    max_upload_mb: float = 25.0  # largest attachment we download
    min_clip_seconds: float = 1.0
    max_clip_seconds: float = 60.0
    max_image_megapixels: float = 40.0  # larger pictures are refused from their header (decompression bombs)
    max_output_seconds: int = 180
    max_queue_length: int = 50
    max_jobs_per_user: int = 2
    submissions_per_minute: int = 4  # per user
    retention_hours: float = 72.0  # finished jobs' files are deleted after this
    library_days: float = 365.0  # /library keeps a track findable this long, its audio files gone or not
    embedder_id: str = "sentence-transformers/all-MiniLM-L6-v2"  # /library's text embedder (ships in a package)
    seed: int | None = None  # fixed seed for every job (reproducible runs); None = random per job
    # Jobs generating at the same time share MusicGen decode loops, this many blocks per loop; 1 turns
    # batching off. The worker runs this many jobs at once (bench.bench_musicgen --batch N).
    max_batch: int = 4
    takes: int = 1  # /compose's default number of takes (1-4)
    # A job that reports no progress for this long is stuck in a call that never returns (a hung GPU): in one
    # process it fails and its thread keeps its slot; a GPU worker exits with status 3 and the job runs elsewhere.
    stall_seconds: float = 600.0

    # Distributed mode (mtm_bot.transport.distributed, mtm_bot.transport.gpu_worker): unset = one process, as always.
    broker_url: str | None = field(
        default=None, repr=False
    )  # redis://host:6379/0 or rediss://:password@host; may hold a password
    broker_prefix: str = "mtm"  # every Redis key and stream of this bot starts with it (several bots, one Redis)
    heartbeat_seconds: float = 2.0  # a GPU worker silent for 3 heartbeats is dead: its jobs run again elsewhere
    blob_ttl_hours: float = 24.0  # clips and results in transit through Redis expire after this
    worker_name: str = ""  # a GPU worker's name in /queue; default: host name and process id
    metrics_port: int = 0  # Prometheus /metrics on this port (bot and each GPU worker); 0 = off

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def max_image_pixels(self) -> int:
        return int(self.max_image_megapixels * 1e6)

    @property
    def database_path(self) -> Path:
        return self.storage_dir / "jobs.sqlite3"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = ".env"
    ) -> Settings:
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        kwargs = {}
        for f in fields(cls):
            name = _ENV_NAMES.get(f.name, "MTM_" + f.name.upper())
            raw = values.get(name)
            if raw is None or raw.strip() == "":
                continue
            kwargs[f.name] = _parse(name, raw.strip(), str(f.type))
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.profile not in ("full", "tiny"):
            raise SettingsError(f"MTM_PROFILE must be 'full' or 'tiny', not {self.profile!r}.")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise SettingsError(f"MTM_DEVICE must be auto, cpu, cuda or cuda:N, not {self.device!r}.")
        if self.compile not in ("auto", "on", "off"):
            raise SettingsError(f"MTM_COMPILE must be auto, on or off, not {self.compile!r}.")
        if not 0 < self.min_clip_seconds <= self.max_clip_seconds:
            raise SettingsError("MTM_MIN_CLIP_SECONDS must be positive and not above MTM_MAX_CLIP_SECONDS.")
        if self.max_output_seconds < 10:
            raise SettingsError("MTM_MAX_OUTPUT_SECONDS must be at least 10.")
        if self.library_days <= 0:
            raise SettingsError("MTM_LIBRARY_DAYS must be positive.")
        if self.broker_url is not None and not self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(
                "MTM_BROKER_URL must be a Redis URL (redis://host:6379/0 or rediss://:password@host:6380/0)."
            )
        if self.heartbeat_seconds <= 0 or self.blob_ttl_hours <= 0 or self.stall_seconds <= 0:
            raise SettingsError("MTM_HEARTBEAT_SECONDS, MTM_STALL_SECONDS and MTM_BLOB_TTL_HOURS must be positive.")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError("MTM_METRICS_PORT must be a port number (0 turns the metrics off).")
        if not 1 <= self.takes <= MAX_TAKES:
            raise SettingsError(f"MTM_TAKES must be between 1 and {MAX_TAKES}.")
        for name in ("max_queue_length", "max_jobs_per_user", "submissions_per_minute", "max_batch"):
            if getattr(self, name) < 1:
                raise SettingsError(f"MTM_{name.upper()} must be at least 1.")


# The Discord variables keep the names the contract gives them (docs/ARCHITECTURE.md).
_ENV_NAMES = {
    "discord_token": "DISCORD_TOKEN",
    "discord_api_base": "DISCORD_API_BASE",
    "discord_gateway_url": "DISCORD_GATEWAY_URL",
    "guild_id": "MTM_GUILD_ID",
    "storage_dir": "MTM_STORAGE_DIR",
}


def _parse(name: str, raw: str, annotation: str):
    kind = str(annotation)
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, not {raw!r}.") from None
    return raw
