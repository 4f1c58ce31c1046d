"""The emulator's rules for synced commands and autocomplete answers (Discord's, from
discord.com/developers/docs/interactions/application-commands), one by one."""

import pytest
from discord_emulator import (
    CHAT_INPUT,
    MESSAGE_COMMAND,
    OPTION_ATTACHMENT,
    OPTION_STRING,
    choices_problem,
    command_problem,
)

SLASH = {
    "name": "compose",
    "type": CHAT_INPUT,
    "description": "Make a track",
    "options": [
        {
            "name": "instruction",
            "type": OPTION_STRING,
            "description": "Your taste",
            "required": True,
            "autocomplete": True,
        },
        {"name": "audio", "type": OPTION_ATTACHMENT, "description": "A clip"},
    ],
}
MENU = {"name": "Compose from this", "type": MESSAGE_COMMAND}


def changed(command: dict, option: int | None = None, **fields) -> dict:
    if option is None:
        return {**command, **fields}
    options = [dict(o) for o in command["options"]]
    options[option].update(fields)
    return {**command, "options": options}


def test_well_formed_commands_pass():
    assert command_problem(SLASH, "[0]") is None and command_problem(MENU, "[1]") is None


@pytest.mark.parametrize(
    "command,where",
    [
        (changed(MENU, description="Compose a track"), "[0]: a user or message command"),
        (changed(MENU, options=SLASH["options"]), "[0]: a user or message command"),
        (changed(MENU, name="C" * 33), "[0].name"),
        (changed(SLASH, name="Compose"), "[0].name"),
        (changed(SLASH, name="compose from"), "[0].name"),
        (changed(SLASH, description=""), "[0].description"),
        (changed(SLASH, 1, description="x" * 101), "[0].options[1].description"),
        (changed(SLASH, 1, autocomplete=True), "[0].options[1].autocomplete"),
        (changed(SLASH, 0, choices=[{"name": "jazz", "value": "jazz"}]), "[0].options[0].autocomplete"),
        (changed(SLASH, options=SLASH["options"][::-1]), "[0].options: required"),
    ],
)
def test_a_command_breaking_a_rule_is_named(command, where):
    assert command_problem(command, "[0]").startswith(where)


@pytest.mark.parametrize(
    "choices,ok",
    [
        ([], True),
        ([{"name": "jazz", "value": "jazz"}] * 25, True),
        ([{"name": "jazz", "value": "jazz"}] * 26, False),
        ([{"name": "x" * 101, "value": "x"}], False),
        ([{"name": "x", "value": "x" * 101}], False),
        ([{"name": "", "value": "x"}], False),
        ([{"name": "ten", "value": 10}], True),
        ([{"name": "ten"}], False),
    ],
)
def test_autocomplete_answers_keep_discords_limits(choices, ok):
    assert (choices_problem({"choices": choices}) is None) is ok
