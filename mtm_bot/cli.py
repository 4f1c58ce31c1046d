"""Command line: the same pipeline as the bot, without Discord.

    python -m mtm_bot compose [INPUT] [--image PICTURE] -i "instruction" -o OUT.wav [--duration S]
                              [--save DIR] [--profile tiny|full] [--seed N] [--json]   (no INPUT: from words alone)
    python -m mtm_bot reroll DIR -o OUT.wav [--save DIR2] [--seed N] [--json]          another take
    python -m mtm_bot extend DIR --seconds S -o OUT.wav [--save DIR2] ...               S more seconds
    python -m mtm_bot remix  DIR -i "instruction" -o OUT.wav [--save DIR2] ...         the same clip, new words
    python -m mtm_bot redo   DIR --from M:SS -o OUT.wav [--save DIR2] ...              a new take from a block on
    python -m mtm_bot edit   DIR --captions FILE -o OUT.wav [--save DIR2] ...          your captions, one per block
    python -m mtm_bot midi   DIR|TRACK -o OUT.mid
    python -m mtm_bot caption INPUT [--profile ...] [--json]
    python -m mtm_bot download
    python -m mtm_bot worker [--profile ...] [--device cuda:N]    one GPU worker (needs MTM_BROKER_URL)

`--save DIR` keeps what the next command starts from in DIR (track.wav, state.npz and the clip); reroll,
extend, remix, redo, edit and midi start from such a DIR. Every command that makes a track takes --profile,
--device, --seed (default: MTM_SEED, else random) and --json.

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
from typing import TYPE_CHECKING

from .core.errors import InputError, ModelUnavailable, MTMError
from .core.progress import Progress
from .core.seeds import choose_seed
from .core.settings import Settings
from .jobs.job import JobKind
from .jobs.kinds import KINDS, Request

if TYPE_CHECKING:
    from .core.audio import Audio
    from .stages.checkpoints import Stage
    from .stages.kept import Kept, KeptFiles
    from .stages.pipeline import ComposeResult

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
MIDI_SUFFIXES = (".mid", ".midi")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code is 2 too; keep the one-line format
        self.print_usage(sys.stderr)
        raise SystemExit(_fail(EXIT_BAD_INPUT, message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m mtm_bot", description="Music -> Text -> Music")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def options(p: argparse.ArgumentParser, *, device: bool = True, seed: bool = True, as_json: bool = True) -> None:
        p.add_argument("--profile", choices=("tiny", "full"), help="model profile (default: MTM_PROFILE or full)")
        if device:
            p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: MTM_DEVICE or auto)")
        if seed:
            p.add_argument("--seed", type=int, help="default: MTM_SEED, else random")
        if as_json:
            p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")

    def track_output(p: argparse.ArgumentParser) -> None:
        p.add_argument("-o", "--output", type=Path, required=True, help=".wav, .flac, .ogg or .mp3")
        p.add_argument(
            "--save",
            type=Path,
            metavar="DIR",
            help="also keep what reroll/extend/remix/redo/midi start from in DIR (created if missing)",
        )

    compose = commands.add_parser("compose", help="caption, refine and generate a new track")
    compose.add_argument("input", type=Path, nargs="?", help="a music clip (without one: from words alone)")
    compose.add_argument("--image", type=Path, help="a picture (PNG, JPEG, WebP, GIF) for the track to evoke")
    compose.add_argument("-i", "--instruction", required=True)
    compose.add_argument(
        "--duration", type=int, help="output seconds (default: the clip rounded up to 10 s, 30 s without a clip)"
    )
    track_output(compose)
    options(compose)

    def derived(name: str, help: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help)
        p.add_argument("folder", type=Path, metavar="DIR", help="a result kept with --save")
        return p

    reroll = derived("reroll", "another take of a kept result: the same captions, a new seed")
    extend = derived("extend", "continue a kept result")
    extend.add_argument("--seconds", type=int, required=True, help="how many seconds to add")
    remix = derived("remix", "a kept result's clip and length in another style")
    remix.add_argument("-i", "--instruction", required=True)
    redo = derived("redo", "keep a kept result up to a block, generate the rest again")
    redo.add_argument(
        "--from",
        dest="start",
        required=True,
        metavar="M:SS",
        help="where a block starts (M:SS or seconds); everything before it is kept",
    )
    edit = derived("edit", "a kept result's plan with your captions, one `M:SS–M:SS caption` line per block")
    edit.add_argument(
        "--captions",
        type=Path,
        required=True,
        metavar="FILE",
        help="the result's caption lines (as printed), edited; no captioning, no LLM",
    )
    for p in (reroll, extend, remix, redo, edit):
        track_output(p)
        options(p)

    midi = commands.add_parser("midi", help="transcribe a track's notes into a MIDI file")
    midi.add_argument("source", type=Path, metavar="DIR|TRACK", help="a result kept with --save, or an audio file")
    midi.add_argument("-o", "--output", type=Path, required=True, help=".mid or .midi")
    # Transcription runs on the CPU with the same model in both profiles; --profile is accepted so that
    # scripts can pass the same options to every command.
    options(midi, device=False, seed=False, as_json=False)

    caption = commands.add_parser("caption", help="caption the clip in 10 s segments")
    caption.add_argument("input", type=Path)
    options(caption, seed=False)

    commands.add_parser("download", help="fetch the full profile's checkpoints into the Hugging Face cache")
    worker = commands.add_parser(
        "worker", help="distributed mode: one GPU worker taking the bot's jobs from Redis (MTM_BROKER_URL)"
    )
    options(worker, seed=False, as_json=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = _settings(args)
        return _COMMANDS[args.command](args, settings)
    except InputError as err:
        return _fail(EXIT_BAD_INPUT, str(err))
    except MTMError as err:
        return _fail(EXIT_INTERNAL, str(err))
    except KeyboardInterrupt:
        return _fail(EXIT_INTERNAL, "interrupted")


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    overrides = {
        k: v for k, v in (("profile", getattr(args, "profile", None)), ("device", getattr(args, "device", None))) if v
    }
    settings = dataclasses.replace(settings, **overrides)
    settings.validate()
    return settings


# Commands. Each refuses bad input before any model loads. ------------------------------------------


def _caption(args: argparse.Namespace, settings: Settings) -> int:
    from .stages.pipeline import Pipeline

    _check_files(args.input)
    pipeline = Pipeline(settings)
    clip = pipeline.read_clip(args.input)
    pipeline.check_weights(["captioner"])
    with _ProgressBar() as bar:
        segments = pipeline.caption(clip, bar.update)
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in segments], ensure_ascii=False, indent=2))
    else:
        from .core.timecode import format_range

        for s in segments:
            print(f"{format_range(s.start, s.end)} {s.caption}")
    return EXIT_OK


def _compose(args: argparse.Namespace, settings: Settings) -> int:
    from .core.instruction import check_instruction
    from .stages.pipeline import Pipeline

    _check_files(args.input, args.image)
    _check_output_path(args.output)
    _check_save_folder(args.save)
    pipeline = Pipeline(settings)
    clip = pipeline.read_clip(args.input) if args.input is not None else None
    if args.image is not None:
        pipeline.read_image(args.image)
    duration = pipeline.output_duration(clip, args.duration)
    instruction = check_instruction(args.instruction)
    loads: list[Stage] = ["refiner", "generator"]
    if clip is not None:
        loads.insert(0, "captioner")
    if args.image is not None:
        loads.append("image_captioner")
    pipeline.check_weights(loads)
    with _ProgressBar() as bar:
        result = pipeline.compose(clip, instruction, duration, seed=args.seed, progress=bar.update, image=args.image)
    return _deliver(args, result, instruction, clip, args.input)


def _derive(args: argparse.Namespace, settings: Settings) -> int:
    """reroll, extend, remix, redo, edit: a new track from the result kept in DIR, by the kind's derivation."""
    from .stages.kept import Kept
    from .stages.pipeline import Pipeline

    source = _saved_result(args.folder)
    _check_output_path(args.output)
    _check_save_folder(args.save)
    redo_from = getattr(args, "start", None)
    if redo_from is not None:
        from .core.timecode import parse_time

        redo_from = parse_time(redo_from)
    instruction = getattr(args, "instruction", None)
    if instruction is not None:
        from .core.instruction import check_instruction

        instruction = check_instruction(instruction)
    spec = KINDS[JobKind(args.command)]
    pipeline = Pipeline(settings)
    kept = Kept.load(source, pipeline.read_clip)
    captions = getattr(args, "captions", None)
    if captions is not None:
        from .stages.pipeline import parse_edited_captions

        _check_files(captions)
        captions = tuple(
            parse_edited_captions(
                captions.read_text(encoding="utf-8", errors="replace"), [(b.start, b.end) for b in kept.blocks]
            )
        )
    request = Request(instruction or kept.instruction, getattr(args, "seconds", None), redo_from, captions)
    # A fixed MTM_SEED gives each command on a kept result its own seed: the kept one would repeat it.
    seed = args.seed if args.seed is not None else choose_seed(settings.seed, f"{args.command} {kept.seed}")
    pipeline.check_weights(spec.loads)
    with _ProgressBar() as bar:
        # The pipeline refuses an extension past the output limit, or a redo not from a block start,
        # before it loads a model.
        assert spec.derivation is not None
        result = spec.derivation(pipeline, kept, request, seed=seed, progress=bar.update)
    return _deliver(args, result, request.instruction, kept.clip, source.clip)


def _midi(args: argparse.Namespace, settings: Settings) -> int:
    from .stages.pipeline import Pipeline

    _check_output_suffix(args.output, MIDI_SUFFIXES)
    if args.source.is_dir():
        track = _saved_track(args.source)
    else:
        _check_files(args.source)
        track = args.source
    # No progress line: a broken track is refused inside transcribe, and its error stays the only line.
    transcription = Pipeline(settings).transcribe(track)
    args.output.write_bytes(transcription.midi_bytes())
    count = len(transcription.notes)
    if count:
        print(
            f"wrote {args.output} ({count} note{'s' if count > 1 else ''} from {transcription.duration:.1f} s)",
            file=sys.stderr,
        )
    else:
        print(f"wrote {args.output}: no notes were found in the track, so the MIDI file holds none", file=sys.stderr)
    return EXIT_OK


# Helpers -------------------------------------------------------------------------------------------


def _deliver(
    args: argparse.Namespace, result: ComposeResult, instruction: str, clip: Audio | None, clip_file: Path | None
) -> int:
    """Write the track, keep it in --save DIR if asked, and report it."""
    from .core.audio import write

    write(result.audio, args.output)
    if args.save is not None:
        _save(args.save, result.kept(instruction, clip), clip_file)
    if args.json:
        saved = str(args.save) if args.save is not None else None
        print(
            json.dumps({"output": str(args.output), "saved": saved, **result.to_json()}, ensure_ascii=False, indent=2)
        )
    else:
        print("\n".join(result.caption_lines()))
        print(f"wrote {args.output} ({result.audio.duration:.1f} s, seed {result.seed})", file=sys.stderr)
        if args.save is not None:
            print(f"kept in {args.save}: reroll, extend, remix, redo or midi can start from it", file=sys.stderr)
    return EXIT_OK


def _save(folder: Path, kept: Kept, clip_file: Path | None) -> None:
    from .stages.kept import KeptFiles, keep_clip

    folder.mkdir(parents=True, exist_ok=True)
    if clip_file is not None:  # first: KeptFiles.in_folder finds the clip by its name
        keep_clip(clip_file, folder)
    kept.save(KeptFiles.in_folder(folder))


def _check_output_path(path: Path) -> None:
    from .stages.kept import KeptFiles

    _check_output_suffix(path, AUDIO_SUFFIXES)
    kept = KeptFiles.in_folder(path.parent)
    if kept.exist() and path.resolve() in {kept.track.resolve(), kept.state.resolve()}:
        raise InputError(f"{path} is part of the result saved in {path.parent}; write the output elsewhere.")


def _check_save_folder(folder: Path | None) -> None:
    """--save never overwrites a kept result (a user's earlier work); nor does -o (_check_output_path)."""
    from .stages.kept import KeptFiles

    if folder is None:
        return
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--save needs a folder, and {folder} is a file.")
    files = KeptFiles.in_folder(folder)
    if files.track.exists() or files.state.exists() or files.clip is not None:
        raise InputError(
            f"{folder} already holds a saved result; save into a new or empty folder (nothing is overwritten)."
        )


def _saved_result(folder: Path) -> KeptFiles:
    from .stages.kept import KeptFiles

    files = KeptFiles.in_folder(folder)
    if not (folder.is_dir() and files.exist()):
        raise InputError(_no_saved_result(folder))
    return files


def _saved_track(folder: Path) -> Path:
    from .stages.kept import KeptFiles

    track = KeptFiles.in_folder(folder).track
    if not track.is_file():
        raise InputError(_no_saved_result(folder))
    return track


def _no_saved_result(folder: Path) -> str:
    return f"{folder} holds no saved result; make one with `compose ... --save {folder}`."


def _check_files(*paths: Path | None) -> None:
    for path in paths:
        if path is not None and not path.is_file():
            raise InputError(f"There is no file at {path}.")


def _check_output_suffix(path: Path, suffixes: tuple[str, ...]) -> None:
    if path.suffix.lower() not in suffixes:
        allowed = ", ".join(suffixes[:-1]) + " or " + suffixes[-1]
        raise InputError(f"The output file must end in {allowed}, not {path.suffix or 'nothing'!r}.")


def _download(settings: Settings) -> int:
    from huggingface_hub import constants, snapshot_download

    from .stages.hub import hub_unreachable

    if constants.is_offline_mode():
        raise ModelUnavailable(
            "Nothing can be downloaded while HF_HUB_OFFLINE is set; unset it and run `download` again."
        )
    if (reason := hub_unreachable()) is not None:  # seconds, not huggingface_hub's half minute of retries
        raise ModelUnavailable(
            f"Cannot download the checkpoints: {reason}. `download` needs network access "
            f"to the hub (or HF_ENDPOINT set to a mirror)."
        )
    from .stages import captioner  # imports torch and transformers: only once there is something to fetch

    _fetch(captioner.CHECKPOINT_REPO, captioner.download)
    for repo in (settings.llm_id, settings.musicgen_id, settings.image_captioner_id):
        _fetch(
            repo,
            lambda: snapshot_download(
                repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
            ),
        )
    print("all checkpoints are in the Hugging Face cache", file=sys.stderr)
    return EXIT_OK


def _fetch(repo: str, fetch: Callable[[], object]) -> None:
    """One repository into the cache; the hub's refusals become a sentence that says what to do."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    print(f"downloading {repo} ...", file=sys.stderr)
    try:
        fetch()
    except GatedRepoError as err:  # before RepositoryNotFoundError: it is one
        raise ModelUnavailable(
            f"{repo} is gated: accept its license at https://huggingface.co/{repo} and log in "
            f"with `huggingface-cli login` (or set HF_TOKEN)."
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelUnavailable(
            f"There is no repository {repo} on the hub (or it is private and you are not logged in)."
        ) from err
    except LocalEntryNotFoundError as err:  # the connection failed after the hub first answered
        raise ModelUnavailable(
            f"The download of {repo} failed: the hub stopped answering. Run `download` again; finished files are kept."
        ) from err
    except HfHubHTTPError as err:
        raise ModelUnavailable(f"The download of {repo} failed: {err}") from err


def _worker(settings: Settings) -> int:
    from .transport.gpu_worker import main

    return main(settings)


_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "compose": _compose,
    "caption": _caption,
    "midi": _midi,
    "download": lambda args, settings: _download(settings),
    "worker": lambda args, settings: _worker(settings),
    **{kind.value: _derive for kind, spec in KINDS.items() if spec.derivation is not None},
}


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


class _ProgressBar:
    """Progress on stderr: one line per stage, then a tqdm bar per generated block."""

    def __init__(self) -> None:
        self._bar = None
        self._key: tuple = ()

    def __enter__(self) -> _ProgressBar:
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
