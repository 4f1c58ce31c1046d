"""/compose's instruction suggestions: presets and a server's recent instructions, within Discord's limits."""

from cogs.utils.instruction_suggestions import MAX_CHOICE_CHARS, MAX_CHOICES, PRESET_INSTRUCTIONS, suggestions


def test_an_empty_instruction_is_offered_the_presets_after_the_recent_ones():
    assert 5 <= len(PRESET_INSTRUCTIONS) <= 8
    assert suggestions("", []) == list(PRESET_INSTRUCTIONS)
    assert suggestions("  ", ["slow waltz"]) == ["slow waltz", *PRESET_INSTRUCTIONS]


def test_typing_filters_ignoring_case_and_spacing():
    recent = ["A Sea Shanty carol", "a slow waltz"]
    assert suggestions("sea  SHANTY", recent) == ["A Sea Shanty carol"]
    assert suggestions("JAZZ", recent) == ["a cosy jazz carol with sleigh bells"]
    assert suggestions("polka", recent) == []


def test_each_suggestion_once_as_first_seen():
    recent = ["a cosy  jazz carol\nwith sleigh bells", "Slow waltz", "slow waltz"]
    assert suggestions("", recent)[:3] == ["a cosy jazz carol with sleigh bells", "Slow waltz", PRESET_INSTRUCTIONS[1]]
    assert len(suggestions("", recent)) == 2 + len(PRESET_INSTRUCTIONS) - 1


def test_at_most_25_choices_of_at_most_100_characters_and_the_presets_keep_their_room():
    recent = [f"carol number {i}" for i in range(40)] + ["carol " + "x" * MAX_CHOICE_CHARS]
    offered = suggestions("", recent)
    assert len(offered) == MAX_CHOICES and offered[-len(PRESET_INSTRUCTIONS) :] == list(PRESET_INSTRUCTIONS)
    assert all(len(text) <= MAX_CHOICE_CHARS for text in suggestions("carol", recent))
