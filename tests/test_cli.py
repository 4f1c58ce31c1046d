"""The command line as a user runs it: `python -m mtm_bot compose|caption ...` with the tiny profile."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import soundfile as sf

from mtm_bot.cli import main
from synth import bad_files, write_music

ROOT = Path(__file__).resolve().parent.parent
BAD_FILES = bad_files(tempfile.mkdtemp(prefix="mtm-cli-"))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTM_PROFILE": "tiny", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mtm_bot", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


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


def run_cli_reporting_imports(*args: str, cwd: Path, env: dict[str, str] | None = None
                              ) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {**os.environ, "MTM_PROFILE": "tiny", **(env or {}), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _REPORT_MODEL_IMPORTS, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return done, json.loads(done.stdout.strip().splitlines()[-1])


def test_compose_a_25_s_stereo_clip_gives_a_30_s_track_and_three_captions(tmp_path):
    clip = write_music(tmp_path / "clip.wav", 25.0, rate=44100, channels=2)
    out = tmp_path / "out.wav"
    done = run_cli("compose", str(clip), "-i", "festive carol with sleigh bells", "-o", str(out), "--seed", "3",
                   cwd=tmp_path)
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
    code = main(["compose", str(clip), "-i", "a cosy jazz carol", "-o", str(out), "--duration", "20",
                 "--seed", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["duration"] == 20.0 and sf.info(out).duration == pytest.approx(20.0, abs=0.01)
    assert [b["range"] for b in result["blocks"]] == ["0:00\u20130:10", "0:10\u20130:20"]
    # One input segment: both output blocks reuse its refined caption.
    assert len(result["input_captions"]) == 1
    assert result["blocks"][0]["caption"] == result["blocks"][1]["caption"] == result["refined"]["segments"][0]["caption"]
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


@pytest.mark.parametrize("args, fragment", [
    (["--duration", "5"], "between 10 and 180"),
    (["--duration", "999"], "between 10 and 180"),
    (["-o", "out.txt"], ".wav, .flac, .ogg or .mp3"),
    (["-i", "carol " * 101], "500 characters"),
])
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
    env = {**os.environ, "MTM_PROFILE": "full", "PYTHONPATH": str(ROOT), "HF_HOME": str(env_home),
           "HF_HUB_CACHE": str(env_home / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "mtm_bot", "caption", str(clip)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "seungheondoh/lp-music-caps" in done.stderr and "python -m mtm_bot download" in done.stderr


def test_full_profile_without_weights_names_every_missing_checkpoint_before_importing_torch(tmp_path):
    """The first run without weights is answered from the cache's contents alone, in about a second."""
    clip = write_music(tmp_path / "clip.wav", 3.0)
    home = tmp_path / "hf"
    env = {"MTM_PROFILE": "full", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1",
           "MTM_LLM_ID": "meta-llama/Llama-3.2-3B-Instruct"}
    done, imported = run_cli_reporting_imports("compose", str(clip), "-i", "a carol", "-o", str(tmp_path / "o.wav"),
                                               cwd=tmp_path, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    for repo in ("seungheondoh/lp-music-caps", "facebook/bart-base", "meta-llama/Llama-3.2-3B-Instruct",
                 "facebook/musicgen-melody", "Salesforce/blip-image-captioning-base"):
        assert repo in done.stderr
    assert "python -m mtm_bot download" in done.stderr
    assert imported == [], f"the missing weights were named only after importing {imported}"
