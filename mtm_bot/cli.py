"""Command line: the same pipeline as the bot, without Discord.

    python -m mtm_bot compose [INPUT] [--image PICTURE] -i "instruction" -o OUT.wav [--duration S]
                              [--profile tiny|full] [--seed N] [--json]     (no INPUT: from words alone)
    python -m mtm_bot caption INPUT [--profile ...] [--json]
    python -m mtm_bot download

Exit codes: 0 ok, 2 bad input (one-line reason on stderr), 1 internal error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import InputError, ModelUnavailable, MTMError
from .progress import Progress
from .settings import Settings

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code is 2 too; keep the one-line format
        self.print_usage(sys.stderr)
        raise SystemExit(_fail(EXIT_BAD_INPUT, message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m mtm_bot", description="Music -> Text -> Music")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", choices=("tiny", "full"), help="model profile (default: MTM_PROFILE or full)")
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: MTM_DEVICE or auto)")
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")

    compose = commands.add_parser("compose", help="caption, refine and generate a new track")
    compose.add_argument("input", type=Path, nargs="?", help="a music clip (without one: from words alone)")
    compose.add_argument("--image", type=Path, help="a picture (PNG, JPEG, WebP, GIF) for the track to evoke")
    compose.add_argument("-i", "--instruction", required=True)
    compose.add_argument("-o", "--output", type=Path, required=True, help=".wav, .flac, .ogg or .mp3")
    compose.add_argument("--duration", type=int,
                         help="output seconds (default: the clip rounded up to 10 s, 30 s without a clip)")
    compose.add_argument("--seed", type=int)
    common(compose)

    caption = commands.add_parser("caption", help="caption the clip in 10 s segments")
    caption.add_argument("input", type=Path)
    common(caption)

    commands.add_parser("download", help="fetch the full profile's checkpoints into the Hugging Face cache")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = _settings(args)
        if args.command == "download":
            return _download(settings)
        return _run(args, settings)
    except InputError as err:
        return _fail(EXIT_BAD_INPUT, str(err))
    except MTMError as err:
        return _fail(EXIT_INTERNAL, str(err))
    except KeyboardInterrupt:
        return _fail(EXIT_INTERNAL, "interrupted")


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    overrides = {k: v for k, v in (("profile", getattr(args, "profile", None)),
                                   ("device", getattr(args, "device", None))) if v}
    settings = dataclasses.replace(settings, **overrides)
    settings.validate()
    return settings


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from .audio import write
    from .pipeline import Pipeline

    image = getattr(args, "image", None)
    for path in (args.input, image):
        if path is not None and not path.is_file():
            raise InputError(f"There is no file at {path}.")
    if args.command == "compose":
        _check_output_suffix(args.output)
    pipeline = Pipeline(settings)
    # Bad input fails here, before any model loads.
    clip = pipeline.read_clip(args.input) if args.input is not None else None
    if image is not None:
        pipeline.read_image(image)
    if args.command == "compose":
        from .instruction import check_instruction

        duration = pipeline.output_duration(clip, args.duration)
        check_instruction(args.instruction)
    pipeline.check_weights()
    with _ProgressBar() as bar:
        if args.command == "caption":
            segments = pipeline.caption(clip, bar.update)
        else:
            result = pipeline.compose(clip, args.instruction, duration, seed=args.seed, progress=bar.update,
                                      image=image)
    if args.command == "caption":
        if args.json:
            print(json.dumps([dataclasses.asdict(s) for s in segments], ensure_ascii=False, indent=2))
        else:
            from .timecode import format_range
            for s in segments:
                print(f"{format_range(s.start, s.end)} {s.caption}")
        return EXIT_OK
    write(result.audio, args.output)
    if args.json:
        print(json.dumps({"output": str(args.output), **result.to_json()}, ensure_ascii=False, indent=2))
    else:
        print("\n".join(result.caption_lines()))
        print(f"wrote {args.output} ({result.audio.duration:.1f} s, seed {result.seed})", file=sys.stderr)
    return EXIT_OK


def _check_output_suffix(path: Path) -> None:
    if path.suffix.lower() not in (".wav", ".flac", ".ogg", ".mp3"):
        raise InputError(f"The output file must end in .wav, .flac, .ogg or .mp3, not {path.suffix or 'nothing'!r}.")


def _download(settings: Settings) -> int:
    from huggingface_hub import constants, snapshot_download

    from .hub import hub_unreachable

    if constants.is_offline_mode():
        raise ModelUnavailable("Nothing can be downloaded while HF_HUB_OFFLINE is set; unset it and run `download` again.")
    if (reason := hub_unreachable()) is not None:  # seconds, not huggingface_hub's half minute of retries
        raise ModelUnavailable(f"Cannot download the checkpoints: {reason}. `download` needs network access "
                               f"to the hub (or HF_ENDPOINT set to a mirror).")
    from . import captioner  # imports torch and transformers: only once there is something to fetch

    _fetch(captioner.CHECKPOINT_REPO, captioner.download)
    for repo in (settings.llm_id, settings.musicgen_id, settings.image_captioner_id):
        _fetch(repo, lambda: snapshot_download(
            repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]))
    print("all checkpoints are in the Hugging Face cache", file=sys.stderr)
    return EXIT_OK


def _fetch(repo: str, fetch: Callable[[], object]) -> None:
    """One repository into the cache; the hub's refusals become a sentence that says what to do."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    print(f"downloading {repo} ...", file=sys.stderr)
    try:
        fetch()
    except GatedRepoError as err:  # before RepositoryNotFoundError: it is one
        raise ModelUnavailable(f"{repo} is gated: accept its license at https://huggingface.co/{repo} and log in "
                               f"with `huggingface-cli login` (or set HF_TOKEN).") from err
    except RepositoryNotFoundError as err:
        raise ModelUnavailable(f"There is no repository {repo} on the hub (or it is private and you are not "
                               f"logged in).") from err
    except LocalEntryNotFoundError as err:  # the connection failed after the hub first answered
        raise ModelUnavailable(f"The download of {repo} failed: the hub stopped answering. Run `download` "
                               f"again; finished files are kept.") from err
    except HfHubHTTPError as err:
        raise ModelUnavailable(f"The download of {repo} failed: {err}") from err


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


class _ProgressBar:
    """Progress on stderr: one line per stage, then a tqdm bar per generated block."""

    def __init__(self) -> None:
        self._bar = None
        self._key: tuple = ()

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, p: Progress) -> None:
        from tqdm import tqdm

        key = (p.stage, p.block)
        if key != self._key:
            self._key = key
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if p.stage != "generating":
                print(f"{p.stage} ...", file=sys.stderr)
            else:
                self._bar = tqdm(total=p.steps, desc=f"block {p.block}/{p.blocks}", unit="step", file=sys.stderr)
        if self._bar is not None:
            self._bar.update(p.step - self._bar.n)
