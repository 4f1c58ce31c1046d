from pathlib import Path

import pytest

from mtm_bot.core.settings import Settings, SettingsError


def test_defaults_match_the_contract():
    s = Settings.from_env(environ={}, env_file=None)
    assert s.discord_api_base == "https://discord.com/api/v10"
    assert s.discord_gateway_url == "wss://gateway.discord.gg/"
    assert s.profile == "full" and s.device == "auto" and s.storage_dir == Path("storage")
    assert s.guild_id is None and s.discord_token is None
    assert s.max_output_seconds == 180 and s.min_clip_seconds == 1.0 and s.max_clip_seconds == 60.0


def test_environment_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("DISCORD_TOKEN=from-file\nMTM_PROFILE=tiny\nMTM_GUILD_ID=42\nMTM_MAX_CLIP_SECONDS=30\n")
    s = Settings.from_env(environ={"DISCORD_TOKEN": "from-env"}, env_file=env_file)
    assert s.discord_token == "from-env"
    assert s.profile == "tiny" and s.guild_id == 42 and s.max_clip_seconds == 30.0


def test_token_never_appears_in_repr():
    s = Settings.from_env(environ={"DISCORD_TOKEN": "secret-token-value"}, env_file=None)
    assert "secret-token-value" not in repr(s)


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"MTM_PROFILE": "huge"}, "MTM_PROFILE"),
        ({"MTM_DEVICE": "tpu"}, "MTM_DEVICE"),
        ({"MTM_MAX_OUTPUT_SECONDS": "ten"}, "MTM_MAX_OUTPUT_SECONDS"),
        ({"MTM_MAX_OUTPUT_SECONDS": "5"}, "MTM_MAX_OUTPUT_SECONDS"),
        ({"MTM_MAX_JOBS_PER_USER": "0"}, "MTM_MAX_JOBS_PER_USER"),
        ({"MTM_STALL_SECONDS": "0"}, "MTM_STALL_SECONDS"),
    ],
)
def test_bad_values_name_the_variable(env, fragment):
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_env(environ=env, env_file=None)


def test_compile_setting_is_validated_and_resolved_per_device():
    import torch

    from mtm_bot.stages.compiling import CompilePlan

    assert Settings.from_env({}, env_file=None).compile == "auto"
    with pytest.raises(SettingsError, match="MTM_COMPILE"):
        Settings.from_env({"MTM_COMPILE": "yes"}, env_file=None)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert CompilePlan.from_setting("auto", cuda) == CompilePlan(enabled=True, required=False)
    assert CompilePlan.from_setting("auto", cpu) == CompilePlan(enabled=False, required=False)
    assert CompilePlan.from_setting("on", cpu) == CompilePlan(enabled=True, required=True)
    assert CompilePlan.from_setting("off", cuda) == CompilePlan(enabled=False, required=False)
