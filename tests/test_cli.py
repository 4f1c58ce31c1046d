"""The command line as a user runs it: `python -m mtm_bot compose|caption|reroll|extend|remix|redo|midi ...`
with the tiny profile."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import soundfile as sf
import torch
from synth import bad_files, write_music

from mtm_bot.cli import main
from mtm_bot.core.settings import Settings
from mtm_bot.stages.captioner import Segment
from mtm_bot.stages.generator import CROSSFADE_SECONDS, EDGE_SECONDS, SAMPLE_RATE
from mtm_bot.stages.kept import Kept, KeptFiles
from mtm_bot.stages.pipeline import Pipeline
from tests.pictures import picture_bytes

ROOT = Path(__file__).resolve().parent.parent
BAD_FILES = bad_files(tempfile.mkdtemp(prefix="mtm-cli-"))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTM_PROFILE": "tiny", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mtm_bot", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


# Runs the CLI's main() in a fresh interpreter, then prints which model libraries it had imported.
_REPORT_MODEL_IMPORTS = """
import json, sys
from mtm_bot.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print(json.dumps(sorted(m for m in ("torch", "transformers", "xgrammar") if m in sys.modules)))
sys.exit(code)
"""


def run_cli_reporting_imports(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {**os.environ, "MTM_PROFILE": "tiny", **(env or {}), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _REPORT_MODEL_IMPORTS, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, json.loads(done.stdout.strip().splitlines()[-1])


def test_compose_a_25_s_stereo_clip_gives_a_30_s_track_and_three_captions(tmp_path):
    clip = write_music(tmp_path / "clip.wav", 25.0, rate=44100, channels=2)
    out = tmp_path / "out.wav"
    done = run_cli(
        "compose", str(clip), "-i", "festive carol with sleigh bells", "-o", str(out), "--seed", "3", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    info = sf.info(out)
    assert info.samplerate == 32000 and info.channels == 1 and info.frames == 30 * 32000
    lines = done.stdout.strip().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["0:00\u20130:10", "0:10\u20130:20", "0:20\u20130:30"]
    assert all(len(line.split(" ", 1)) == 2 for line in lines)  # each range carries a caption
    assert "block 3/3" in done.stderr  # the progress bar went to stderr


def test_duration_on_a_short_clip_cycles_its_captions_and_prints_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MTM_PROFILE", "tiny")
    monkeypatch.chdir(tmp_path)
    clip = write_music(tmp_path / "hum.flac", 9.0, rate=22050)
    out = tmp_path / "out.ogg"
    code = main(
        ["compose", str(clip), "-i", "a cosy jazz carol", "-o", str(out), "--duration", "20", "--seed", "1", "--json"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["duration"] == 20.0 and sf.info(out).duration == pytest.approx(20.0, abs=0.01)
    assert [b["range"] for b in result["blocks"]] == ["0:00\u20130:10", "0:10\u20130:20"]
    # One input segment: both output blocks reuse its refined caption.
    assert len(result["input_captions"]) == 1
    assert (
        result["blocks"][0]["caption"] == result["blocks"][1]["caption"] == result["refined"]["segments"][0]["caption"]
    )
    assert set(result["timings"]) == {"caption", "refine", "generate"}


def test_caption_prints_one_line_per_segment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MTM_PROFILE", "tiny")
    clip = write_music(tmp_path / "clip.wav", 12.5)
    assert main(["caption", str(clip), "--json"]) == 0
    segments = json.loads(capsys.readouterr().out)
    assert [(s["start"], s["end"]) for s in segments] == [(0.0, 10.0), (10.0, 12.5)]
    assert all(isinstance(s["caption"], str) for s in segments)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_input_exits_2_with_a_one_line_reason(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MTM_PROFILE", "tiny")
    path, _ = BAD_FILES[name]
    code = main(["compose", str(path), "-i", "carol", "-o", str(tmp_path / "out.wav")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    assert not (tmp_path / "out.wav").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--duration", "5"], "between 10 and 180"),
        (["--duration", "999"], "between 10 and 180"),
        (["-o", "out.txt"], ".wav, .flac, .ogg or .mp3"),
        (["-i", "carol " * 101], "500 characters"),
    ],
)
def test_bad_arguments_exit_2_before_any_model_library_is_imported(args, fragment, tmp_path):
    clip = write_music(tmp_path / "clip.wav", 3.0)
    argv = ["compose", str(clip), "-i", "carol", "-o", str(tmp_path / "out.wav"), *args]
    done, imported = run_cli_reporting_imports(*argv, cwd=tmp_path)
    assert done.returncode == 2 and fragment in done.stderr and "Traceback" not in done.stderr
    assert imported == [], f"a bad argument was answered only after importing {imported}"


def test_missing_input_file_is_a_bad_input(tmp_path):
    done = run_cli("caption", str(tmp_path / "nope.wav"), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: ")


def test_full_profile_without_weights_names_the_repo_and_the_download_command(tmp_path, monkeypatch):
    clip = write_music(tmp_path / "clip.wav", 3.0)
    env_home = tmp_path / "hf"
    env = {
        **os.environ,
        "MTM_PROFILE": "full",
        "PYTHONPATH": str(ROOT),
        "HF_HOME": str(env_home),
        "HF_HUB_CACHE": str(env_home / "hub"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "mtm_bot", "caption", str(clip)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "seungheondoh/lp-music-caps" in done.stderr and "python -m mtm_bot download" in done.stderr


def test_full_profile_without_weights_names_every_missing_checkpoint_before_importing_torch(tmp_path):
    """The first run without weights is answered from the cache's contents alone, in about a second."""
    clip = write_music(tmp_path / "clip.wav", 3.0)
    picture = tmp_path / "picture.png"  # with a clip and a picture, compose loads all five checkpoints
    picture.write_bytes(picture_bytes())
    home = tmp_path / "hf"
    env = {
        "MTM_PROFILE": "full",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "1",
        "MTM_LLM_ID": "meta-llama/Llama-3.2-3B-Instruct",
    }
    done, imported = run_cli_reporting_imports(
        "compose",
        str(clip),
        "-i",
        "a carol",
        "-o",
        str(tmp_path / "o.wav"),
        "--image",
        str(picture),
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    for repo in (
        "seungheondoh/lp-music-caps",
        "facebook/bart-base",
        "meta-llama/Llama-3.2-3B-Instruct",
        "facebook/musicgen-melody",
        "Salesforce/blip-image-captioning-base",
    ):
        assert repo in done.stderr
    assert "python -m mtm_bot download" in done.stderr
    assert imported == [], f"the missing weights were named only after importing {imported}"


# Starting from a kept result: compose --save DIR, then reroll/extend/remix/redo/midi DIR ------------------

SEAM_SAMPLES = round((EDGE_SECONDS + CROSSFADE_SECONDS) * SAMPLE_RATE)  # the crossfade ends this far before a seam


def tiny(command: str, *args: str) -> int:
    return main([command, *args, "--profile", "tiny"])


def load_kept(folder: Path) -> Kept:
    return Kept.load(KeptFiles.in_folder(folder), read_clip=Pipeline(Settings(profile="tiny")).read_clip)


def track(path: Path) -> np.ndarray:
    return sf.read(path, dtype="int16")[0]


def midi_notes(path: Path) -> list[pretty_midi.Note]:
    return [n for instrument in pretty_midi.PrettyMIDI(str(path)).instruments for n in instrument.notes]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A 20 s track (two blocks) from a 14 s clip (two segments), kept with compose --save."""
    root = tmp_path_factory.mktemp("saved")
    clip = write_music(root / "hum.flac", 14.0, rate=22050)
    folder = root / "new" / "kept"  # created, parents too
    assert (
        tiny(
            "compose",
            str(clip),
            "-i",
            "a cosy jazz carol",
            "-o",
            str(root / "out.wav"),
            "--duration",
            "20",
            "--seed",
            "3",
            "--save",
            str(folder),
        )
        == 0
    )
    return folder


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Every model stage fails the test if it is loaded (or the transcriber run): bad input must be refused
    before."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for stage in ("captioner", "refiner", "generator", "image_captioner"):
        monkeypatch.setattr(Pipeline, stage, property(load))
    monkeypatch.setattr(Pipeline, "transcribe", load)


def test_compose_save_keeps_the_track_its_codes_and_the_clip(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["clip.flac", "state.npz", "track.wav"]
    kept = load_kept(saved)
    assert (kept.instruction, kept.seed, kept.duration) == ("a cosy jazz carol", 3, 20.0)
    assert [b.start for b in kept.blocks] == [0.0, 10.0] and len(kept.segments) == 2
    assert kept.rendered.codes.shape[-1] == 20 * 50
    np.testing.assert_array_equal(track(saved / "track.wav"), track(saved.parent.parent / "out.wav"))


def test_reroll_is_another_take_of_the_same_length_and_can_be_kept_again(saved, tmp_path, capsys):
    out, again = tmp_path / "reroll.wav", tmp_path / "again"
    assert tiny("reroll", str(saved), "-o", str(out), "--seed", "99", "--save", str(again), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["seed"], result["saved"], result["duration"]) == (99, str(again), 20.0)
    assert [b["range"] for b in result["blocks"]] == ["0:00\u20130:10", "0:10\u20130:20"]
    assert sf.info(out).frames == 20 * SAMPLE_RATE
    assert not np.array_equal(track(out), track(saved / "track.wav"))
    # The new folder starts the next command: the clip came along, the instruction is the original's.
    assert (again / "clip.flac").read_bytes() == (saved / "clip.flac").read_bytes()
    kept = load_kept(again)
    assert (kept.seed, kept.instruction) == (99, "a cosy jazz carol")


def test_extend_adds_the_seconds_and_keeps_the_original_up_to_the_seam(saved, tmp_path, capsys):
    out = tmp_path / "longer.wav"
    assert tiny("extend", str(saved), "--seconds", "10", "-o", str(out), "--seed", "8") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["0:00\u20130:10", "0:10\u20130:20", "0:20\u20130:30"]
    longer, original = track(out), track(saved / "track.wav")
    assert len(longer) == len(original) + 10 * SAMPLE_RATE
    cut = len(original) - SEAM_SAMPLES
    np.testing.assert_array_equal(longer[:cut], original[:cut])


def test_remix_keeps_the_new_instruction_for_the_next_command(saved, tmp_path):
    out, remixed = tmp_path / "remix.ogg", tmp_path / "remixed"
    assert tiny("remix", str(saved), "-i", "  a heavy metal anthem ", "-o", str(out), "--save", str(remixed)) == 0
    assert sf.info(out).duration == pytest.approx(20.0, abs=0.01)
    kept, original = load_kept(remixed), load_kept(saved)
    assert kept.instruction == "a heavy metal anthem"
    assert kept.segments == original.segments  # the clip's captions, not captioned again


def test_redo_keeps_the_codes_and_samples_before_the_block(saved, tmp_path):
    out, redone = tmp_path / "redo.wav", tmp_path / "redone"
    assert tiny("redo", str(saved), "--from", "0:10", "-o", str(out), "--seed", "21", "--save", str(redone)) == 0
    kept, original = load_kept(redone), load_kept(saved)
    assert torch.equal(kept.rendered.codes[..., :500], original.rendered.codes[..., :500])
    assert not torch.equal(kept.rendered.codes[..., 500:], original.rendered.codes[..., 500:])
    new, old = track(out), track(saved / "track.wav")
    assert len(new) == len(old)
    cut = 10 * SAMPLE_RATE - SEAM_SAMPLES
    np.testing.assert_array_equal(new[:cut], old[:cut])


def test_redo_takes_plain_seconds_too(saved, tmp_path):
    out = tmp_path / "redo.flac"
    assert tiny("redo", str(saved), "--from", "10", "-o", str(out)) == 0
    assert sf.info(out).frames == 20 * SAMPLE_RATE


def test_edit_generates_from_the_edited_lines_and_refuses_bad_ones_with_one_line(saved, tmp_path, capsys):
    lines = ["0:00\u20130:10 a lone cello", "0:10\u20130:20 a marching band"]
    (tmp_path / "lines.txt").write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "edit.wav"
    assert tiny("edit", str(saved), "--captions", str(tmp_path / "lines.txt"), "-o", str(out), "--seed", "5") == 0
    assert capsys.readouterr().out.strip().splitlines() == lines
    assert sf.info(out).frames == 20 * SAMPLE_RATE
    (tmp_path / "bad.txt").write_text(lines[0], encoding="utf-8")
    assert tiny("edit", str(saved), "--captions", str(tmp_path / "bad.txt"), "-o", str(tmp_path / "bad.wav")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "write 2 lines, one per block; you wrote 1" in err[0], err


def test_a_track_from_words_alone_can_be_remixed_and_extended(tmp_path):
    first, remixed = tmp_path / "first", tmp_path / "remixed"
    assert (
        tiny(
            "compose",
            "-i",
            "a slow waltz for strings",
            "-o",
            str(tmp_path / "a.wav"),
            "--duration",
            "10",
            "--save",
            str(first),
        )
        == 0
    )
    assert tiny("remix", str(first), "-i", "a fast polka", "-o", str(tmp_path / "b.wav"), "--save", str(remixed)) == 0
    out = tmp_path / "c.wav"
    assert tiny("extend", str(remixed), "--seconds", "10", "-o", str(out)) == 0
    assert sf.info(out).frames == 20 * SAMPLE_RATE
    assert sorted(p.name for p in remixed.iterdir()) == ["state.npz", "track.wav"]  # no clip: no melody
    assert load_kept(remixed).clip is None


def test_midi_writes_a_file_a_midi_library_reads_and_reports_the_note_count(tmp_path, capsys):
    tune = write_music(tmp_path / "tune.ogg", 6.0)
    out = tmp_path / "tune.mid"
    assert tiny("midi", str(tune), "-o", str(out)) == 0
    notes = midi_notes(out)
    assert len(notes) > 1 and f"({len(notes)} notes from 6.0 s)" in capsys.readouterr().err


def test_midi_of_a_kept_folder_transcribes_its_track(saved, tmp_path):
    from_folder, from_track = tmp_path / "folder.mid", tmp_path / "track.midi"
    assert tiny("midi", str(saved), "-o", str(from_folder)) == 0
    assert tiny("midi", str(saved / "track.wav"), "-o", str(from_track)) == 0
    assert from_folder.read_bytes() == from_track.read_bytes()
    midi_notes(from_folder)  # parses


def test_midi_says_so_when_a_track_holds_no_notes(tmp_path, capsys):
    blip = write_music(tmp_path / "blip.wav", 0.1)  # shorter than the shortest note the transcriber reports
    out = tmp_path / "blip.mid"
    assert tiny("midi", str(blip), "-o", str(out)) == 0
    assert "no notes" in capsys.readouterr().err
    assert midi_notes(out) == []


def test_midi_of_a_file_that_is_not_audio_exits_2_with_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF but not really a WAV file")
    assert tiny("midi", str(broken), "-o", str(tmp_path / "out.mid")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not (tmp_path / "out.mid").exists()


# Refused with exit 2 and one sentence: arguments ({saved}: the kept folder, {tmp}: a fresh folder holding an
# empty folder and a clip) and a fragment of the sentence.
REFUSALS = {
    "DIR without a kept result": (
        ["reroll", "{tmp}/empty", "-o", "{tmp}/out.wav"],
        "holds no saved result; make one with `compose ... --save",
    ),
    "DIR that does not exist": (
        ["extend", "{tmp}/nope", "--seconds", "10", "-o", "{tmp}/out.wav"],
        "holds no saved result",
    ),
    "midi from a DIR without a track": (["midi", "{tmp}/empty", "-o", "{tmp}/out.mid"], "holds no saved result"),
    "compose --save into a kept result": (
        ["compose", "{tmp}/clip.wav", "-i", "carol", "-o", "{tmp}/out.wav", "--save", "{saved}"],
        "already holds a saved result",
    ),
    "reroll --save into its own DIR": (
        ["reroll", "{saved}", "-o", "{tmp}/out.wav", "--save", "{saved}"],
        "already holds a saved result",
    ),
    "-o onto a kept track": (["reroll", "{saved}", "-o", "{saved}/track.wav"], "is part of the result saved in"),
    "--from garbage": (["redo", "{saved}", "--from", "half past", "-o", "{tmp}/out.wav"], "is not a time"),
    "--from not a block start": (["redo", "{saved}", "--from", "0:05", "-o", "{tmp}/out.wav"], "pick one of 0:10"),
    "--from the first block": (["redo", "{saved}", "--from", "0:00", "-o", "{tmp}/out.wav"], "pick one of 0:10"),
    "extend past the output limit": (["extend", "{saved}", "--seconds", "30", "-o", "{tmp}/out.wav"], "40 s limit"),
    "extend by too little": (["extend", "{saved}", "--seconds", "5", "-o", "{tmp}/out.wav"], "10 to 60 seconds"),
    "midi into a WAV": (["midi", "{saved}", "-o", "{tmp}/out.wav"], ".mid or .midi"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_derived_input_exits_2_with_one_sentence_before_any_model_loads(
    case, saved, tmp_path, capsys, monkeypatch, no_model_loads
):
    monkeypatch.setenv("MTM_MAX_OUTPUT_SECONDS", "40")
    (tmp_path / "empty").mkdir()
    write_music(tmp_path / "clip.wav", 3.0)
    kept_before = {p.name: p.read_bytes() for p in saved.iterdir()}
    args, fragment = REFUSALS[case]
    code = tiny(*(a.format(saved=saved, tmp=tmp_path) for a in args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not list(tmp_path.glob("out.*"))
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == kept_before  # nothing overwritten


# The full profile checks, offline, only the checkpoints of the stages the command loads --------------------

LP_MUSICCAPS, BART = "seungheondoh/lp-music-caps", "facebook/bart-base"


@pytest.fixture()
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path, offline: the full profile finds no checkpoint there."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return home / "hub"


def cache_placeholder(hub: Path, repo: str, filename: str) -> None:
    """An empty file where huggingface_hub keeps `filename` of `repo`'s main revision."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / commit / filename).write_bytes(b"")


def missing_checkpoints(args: list[str], capsys) -> set[str]:
    """Run a --profile full command that must stop at the weight check; the repos its one error names."""
    settings = Settings.from_env()
    repos = (LP_MUSICCAPS, BART, settings.llm_id, settings.musicgen_id, settings.image_captioner_id)
    assert main([*args, "--profile", "full"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "are not in the local Hugging Face cache" in error[0], error
    assert "python -m mtm_bot download" in error[0]
    return {repo for repo in repos if repo in error[0]}


def test_caption_asks_only_for_the_captioners_checkpoints(empty_hf_cache, tmp_path, capsys, no_model_loads):
    clip = write_music(tmp_path / "clip.wav", 3.0)
    assert missing_checkpoints(["caption", str(clip)], capsys) == {LP_MUSICCAPS, BART}


def test_caption_runs_with_only_the_captioners_checkpoints_cached(empty_hf_cache, tmp_path, capsys, monkeypatch):
    """Neither the LLM, MusicGen nor BLIP is cached, and caption does not need them."""
    cache_placeholder(empty_hf_cache, LP_MUSICCAPS, "transfer.pth")
    cache_placeholder(empty_hf_cache, BART, "config.json")
    monkeypatch.setattr(Pipeline, "caption", lambda self, clip, progress: [Segment(0.0, 3.0, "a calm piano")])
    clip = write_music(tmp_path / "clip.wav", 3.0)
    assert main(["caption", str(clip), "--profile", "full"]) == 0
    assert capsys.readouterr().out.strip() == "0:00–0:03 a calm piano"


def test_each_command_asks_for_the_checkpoints_of_the_stages_it_loads(
    empty_hf_cache, saved, tmp_path, capsys, no_model_loads
):
    settings = Settings.from_env()
    llm, musicgen, blip = settings.llm_id, settings.musicgen_id, settings.image_captioner_id
    clip = write_music(tmp_path / "clip.wav", 3.0)
    picture = tmp_path / "picture.png"
    picture.write_bytes(picture_bytes())
    lines = tmp_path / "lines.txt"
    lines.write_text("0:00\u20130:10 a cello\n0:10\u20130:20 a band", encoding="utf-8")
    out = str(tmp_path / "out.wav")
    expected = {
        ("compose", str(clip), "-i", "a carol", "-o", out): {LP_MUSICCAPS, BART, llm, musicgen},
        ("compose", "-i", "a carol", "-o", out): {llm, musicgen},  # from words alone: nothing to caption
        ("compose", "-i", "a carol", "-o", out, "--image", str(picture)): {llm, musicgen, blip},
        ("reroll", str(saved), "-o", out): {musicgen},  # the kept captions and refinement
        ("extend", str(saved), "--seconds", "10", "-o", out): {musicgen},
        ("redo", str(saved), "--from", "0:10", "-o", out): {musicgen},
        ("edit", str(saved), "--captions", str(lines), "-o", out): {musicgen},  # neither captioner nor LLM
        ("remix", str(saved), "-i", "a march", "-o", out): {llm, musicgen},  # a new refinement
    }
    for args, repos in expected.items():
        assert missing_checkpoints(list(args), capsys) == repos, args
