"""The emulator's message components, component interactions and modals, through the real wire format.

A small discord.py bot (no MTM models) answers /panel with a view like the bot's result buttons: plain
buttons, a select, a link button, a disabled button and a DynamicItem; its Extend button opens a modal.
Tests click and choose like a user and check both sides: what the bot's callbacks saw and what the
emulator recorded. Component rules are checked one by one on the emulator's rule functions, and a
few end to end, where the bot's request must come back 400.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import Callable
from typing import Any

import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands
from discord_emulator import (
    ACTION_ROW,
    BUTTON,
    COMPONENTS_V2,
    DEFERRED_CHANNEL_MESSAGE,
    DEFERRED_UPDATE_MESSAGE,
    LABEL,
    MODAL,
    UPDATE_MESSAGE,
    DiscordEmulator,
    FakeUser,
    Message,
    component_problem,
    modal_problem,
    walk_components,
)

from bot import point_discord_at
from mtm_bot.core.settings import Settings

on_the_bot = pytest.mark.asyncio(loop_scope="module")  # one bot serves the module's end-to-end tests

JOB = "ab12cd34"


class Reroll(discord.ui.DynamicItem[discord.ui.Button], template=r"test:reroll:(?P<job>[0-9a-f]{8})"):
    """Like the bot's result buttons: rebuilt from the clicked message's custom_id, no view kept in memory."""

    def __init__(self, job: str) -> None:
        super().__init__(discord.ui.Button(label="🎲 Reroll", custom_id=f"test:reroll:{job}"))
        self.job = job

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item, match: re.Match[str]):
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.record("reroll", self.job)
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send(f"rerolling {self.job}")  # replaces "thinking", ephemeral like it


class Extend(discord.ui.Modal, title="Extend the track"):
    # The two layouts discord.py 2.7 sends: a text input in an action row, and one in a Label (type 18).
    seconds = discord.ui.TextInput(label="Seconds to add", default="30", max_length=3)
    note = discord.ui.Label(text="Note", component=discord.ui.TextInput(required=False))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.client.record("extend", self.seconds.value, self.note.component.value)
        await interaction.response.edit_message(content=f"extending by {self.seconds.value} s")


class Panel(discord.ui.View):
    def __init__(self) -> None:
        super().__init__(timeout=None)
        self.clicks = 0
        self.add_item(discord.ui.Button(label="Docs", url="https://example.com/docs"))
        self.add_item(Reroll(JOB))

    @discord.ui.button(label="Extend", custom_id="test:extend")
    async def extend(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_modal(Extend())

    @discord.ui.button(label="Count", custom_id="test:count")
    async def count(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.clicks += 1
        await interaction.client.record("count", self.clicks)
        await interaction.response.edit_message(content=f"clicked {self.clicks}")

    @discord.ui.button(label="Locked", custom_id="test:locked", disabled=True)
    async def locked(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.client.record("locked")

    @discord.ui.button(label="Done", custom_id="test:done", row=2)
    async def done(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.defer()
        await interaction.message.edit(view=None)  # through the channel, not the interaction's webhook

    @discord.ui.select(
        placeholder="Redo from…",
        custom_id="test:redo",
        options=[discord.SelectOption(label=f"0:{s}", value=str(s)) for s in (10, 20, 30)],
    )
    async def redo(self, interaction: discord.Interaction, select: discord.ui.Select) -> None:
        await interaction.client.record("redo", select.values)
        await interaction.response.defer()
        await interaction.edit_original_response(content=f"redo from {select.values[0]} s")
        undo = discord.ui.View().add_item(discord.ui.Button(label="Undo", custom_id="test:undo"))
        await interaction.followup.send("redo queued", ephemeral=True, view=undo)


def broken(kind: str) -> discord.ui.View | discord.ui.Modal:
    """A view or modal that breaks one of Discord's rules which discord.py does not check itself."""
    if kind == "modal title":
        return discord.ui.Modal(title="t" * 46).add_item(discord.ui.TextInput(label="x"))
    view = discord.ui.View()
    if kind == "label":
        return view.add_item(discord.ui.Button(label="x" * 81, custom_id="long"))
    return view.add_item(discord.ui.Button(label="a", custom_id="same")).add_item(
        discord.ui.Button(label="b", custom_id="same")
    )


@app_commands.command(description="a result with buttons")
async def panel(interaction: discord.Interaction) -> None:
    await interaction.response.send_message("panel", view=Panel())
    sent = await interaction.original_response()  # read back from the emulator's payload
    shown = [getattr(item, "label", None) or item.placeholder for row in sent.components for item in row.children]
    await interaction.client.record("panel", shown)


@app_commands.command(description="a modal straight from a slash command")
async def form(interaction: discord.Interaction) -> None:
    await interaction.response.send_modal(Extend())


@app_commands.command(description="a message or modal that breaks a component rule")
async def bad(interaction: discord.Interaction, kind: str) -> None:
    thing = broken(kind)
    try:
        if isinstance(thing, discord.ui.Modal):
            await interaction.response.send_modal(thing)
        else:
            await interaction.response.send_message("bad", view=thing)
    except discord.HTTPException as err:
        await interaction.client.record("refused", kind, err.status, err.code, err.text)


class PanelBot(commands.Bot):
    def __init__(self, guild_id: int) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned, intents=discord.Intents(guilds=True), help_command=None
        )
        self.guild = discord.Object(guild_id)
        self.seen: list[tuple] = []  # what the callbacks saw, in order
        self.changed = asyncio.Condition()

    async def record(self, *what: Any) -> None:
        async with self.changed:
            self.seen.append(what)
            self.changed.notify_all()

    async def saw(self, what: Callable[[tuple], bool], name: str) -> tuple:
        """Wait until a callback recorded something that `what` accepts."""

        async def recorded() -> tuple:
            async with self.changed:
                while not (found := next((s for s in self.seen if what(s)), None)):
                    await self.changed.wait()
                return found

        try:
            return await asyncio.wait_for(recorded(), 10)
        except TimeoutError:
            raise AssertionError(f"the bot never saw {name}; it saw {self.seen}") from None

    async def setup_hook(self) -> None:
        self.add_dynamic_items(Reroll)
        for command in (panel, form, bad):
            self.tree.add_command(command, guild=self.guild)
        await self.tree.sync(guild=self.guild)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world():
    emulator = await DiscordEmulator().start()
    settings = Settings.from_env(emulator.env(), env_file=None)
    point_discord_at(settings)
    bot = PanelBot(emulator.guild_id)
    runner = asyncio.create_task(bot.start(settings.discord_token))
    await emulator.wait_for(lambda: runner.done() or (emulator.connected and emulator.commands), 30, "bot start")
    if runner.done():
        runner.result()  # raises the start-up error
    yield emulator, bot
    await bot.close()
    await asyncio.wait_for(runner, 30)
    await emulator.stop()


async def new_panel(emulator: DiscordEmulator) -> tuple[FakeUser, Message]:
    user = emulator.user("player")
    interaction = await emulator.slash(user, "panel")
    await emulator.wait_for(lambda: interaction.response, 10, "/panel reply")
    return user, interaction.response


@on_the_bot
async def test_components_are_kept_and_read_back_by_discord_py(world):
    emulator, bot = world
    _, message = await new_panel(emulator)
    first_row, second_row, third_row = message.components
    labels = [button["label"] for button in first_row["components"]]
    assert labels == ["Extend", "Count", "Locked", "Docs", "🎲 Reroll"]
    (select,) = second_row["components"]
    assert [o["value"] for o in select["options"]] == ["10", "20", "30"] and select["placeholder"] == "Redo from…"
    assert [button["label"] for button in third_row["components"]] == ["Done"]
    ids = [c["id"] for row in message.components for c in [row, *row["components"]]]
    assert len(set(ids)) == len(ids) and all(ids)  # numbered like Discord does
    read_back = await bot.saw(lambda s: s[0] == "panel", "the panel read back")
    assert read_back[1] == [*labels, "Redo from…", "Done"]
    assert not emulator.refused


@on_the_bot
async def test_a_click_updates_the_message_it_is_on(world):
    emulator, bot = world
    user, message = await new_panel(emulator)
    components = message.components
    for n in (1, 2):
        click = await emulator.click(user, message, "Count")
        await emulator.wait_for(lambda: message.content == f"clicked {n}", 10, f"click {n} shown")
        assert click.callback_type == UPDATE_MESSAGE and click.response is message and not click.callback_errors
        assert click.message is message and click.command == "test:count"
    assert message.components == components  # an edit without components keeps them
    assert not [m for m in emulator.messages if m.interaction_id == click.id]  # no new message
    with pytest.raises(AssertionError, match="with callback type 7, not with a modal"):
        await emulator.submit_modal(user, click, {})


@on_the_bot
async def test_a_select_defers_edits_the_original_and_follows_up_ephemerally(world):
    emulator, bot = world
    user, message = await new_panel(emulator)
    choice = await emulator.choose(user, message, "20", placeholder="Redo")
    await emulator.wait_for(lambda: choice.followups, 10, "the follow-up")
    assert ("redo", ["20"]) in bot.seen
    assert choice.callback_type == DEFERRED_UPDATE_MESSAGE and message.content == "redo from 20 s"
    (followup,) = choice.followups
    assert followup.ephemeral and followup.via == "followup" and followup.content == "redo queued"
    assert [c["label"] for _, c in walk_components(followup.components) if c["type"] == BUTTON] == ["Undo"]

    others = len(emulator.interactions)
    with pytest.raises(AssertionError, match="ephemeral, only player sees it"):
        await emulator.click(emulator.user("stranger"), followup, "Undo")
    assert len(emulator.interactions) == others


@on_the_bot
async def test_a_dynamic_item_is_rebuilt_from_the_clicked_message(world):
    emulator, bot = world
    user, message = await new_panel(emulator)
    click = await emulator.click(user, message, "Reroll")
    await emulator.wait_for(lambda: click.response and not click.response.thinking, 10, "the reroll reply")
    assert ("reroll", JOB) in bot.seen and click.callback_type == DEFERRED_CHANNEL_MESSAGE
    assert click.visible_messages() == [click.response] and click.response.ephemeral
    assert click.response.content == f"rerolling {JOB}" and message.content == "panel"


@on_the_bot
async def test_a_message_edited_through_its_channel_loses_its_buttons(world):
    emulator, bot = world
    user, message = await new_panel(emulator)
    await emulator.click(user, message, "Done")
    await emulator.wait_for(lambda: not message.components, 10, "the buttons removed")
    assert message.content == "panel" and message.history[-2]["components"]
    with pytest.raises(AssertionError, match=r"no button labelled with 'Count'.*: \[\]"):
        await emulator.click(user, message, "Count")


@on_the_bot
async def test_a_modal_opened_by_a_button_is_submitted_and_updates_the_message(world):
    emulator, bot = world
    user, message = await new_panel(emulator)
    opened = await emulator.click(user, message, "Extend")
    modal = await emulator.wait_for(lambda: opened.modal, 10, "the modal")  # click() returns once dispatched
    assert opened.callback_type == MODAL and not opened.followups and opened.response is None
    assert modal.title == "Extend the track"
    assert [(i.label, i.value, i.required) for i in modal.inputs] == [
        ("Seconds to add", "30", True),
        ("Note", "", False),
    ]
    assert [c["type"] for c in modal.components] == [ACTION_ROW, LABEL]

    with pytest.raises(AssertionError, match="no input 'Volume'"):
        await emulator.submit_modal(user, opened, {"Volume": "11"})
    with pytest.raises(AssertionError, match="'Seconds to add' is required"):
        await emulator.submit_modal(user, opened, {"Seconds to add": ""})
    with pytest.raises(AssertionError, match="takes 0 to 3 characters"):
        await emulator.submit_modal(user, opened, {"Seconds to add": "1000"})
    with pytest.raises(AssertionError, match="shown to player, not to stranger"):
        await emulator.submit_modal(emulator.user("stranger"), opened, {})

    submitted = await emulator.submit_modal(user, opened, {"Note": "louder"})  # the seconds keep their "30"
    await emulator.wait_for(lambda: message.content == "extending by 30 s", 10, "the modal's update")
    assert ("extend", "30", "louder") in bot.seen
    assert submitted.callback_type == UPDATE_MESSAGE and submitted.message is message
    assert submitted.command == modal.custom_id and not submitted.callback_errors


@on_the_bot
async def test_a_modal_from_a_slash_command_has_no_message_to_update(world):
    emulator, bot = world
    user = emulator.user("former")
    opened = await emulator.slash(user, "form")
    submitted = await emulator.submit_modal(user, opened, {"Seconds to add": "15", "Note": "quietly"})  # waits for it
    await emulator.wait_for(lambda: submitted.callback_errors, 10, "the refused update")
    assert ("extend", "15", "quietly") in bot.seen  # on_submit ran; its type 7 answer was refused
    assert submitted.callback_type is None and submitted.response is None


@on_the_bot
async def test_what_a_user_cannot_click_is_never_dispatched(world):
    emulator, bot = world
    user, message = await new_panel(emulator)
    before = len(emulator.interactions)
    with pytest.raises(AssertionError, match="'Locked' on message .* is disabled"):
        await emulator.click(user, message, "Locked")
    with pytest.raises(AssertionError, match=r"no button labelled with 'MIDI'.*\['Extend', 'Count'"):
        await emulator.click(user, message, "MIDI")
    with pytest.raises(AssertionError, match="opens a link"):
        await emulator.click(user, message, "Docs")
    with pytest.raises(AssertionError, match=r"no select offers '99'.*\['10', '20', '30'\]"):
        await emulator.choose(user, message, "99")
    with pytest.raises(AssertionError, match="no select offers '10'"):
        await emulator.choose(user, message, "10", placeholder="Volume")
    assert len(emulator.interactions) == before and ("locked",) not in bot.seen


@on_the_bot
@pytest.mark.parametrize(
    "kind, reason",
    [
        ("label", "label: Must be 80 or fewer"),
        ("duplicate", "'same' is used twice"),
        ("modal title", "title: must be 1 to 45"),
    ],
)
async def test_a_message_or_modal_breaking_a_rule_is_refused_with_400(world, kind, reason):
    emulator, bot = world
    refused = len(emulator.refused)
    interaction = await emulator.slash(emulator.user("breaker"), "bad", {"kind": kind})
    *_, status, code, text = await bot.saw(lambda s: s[:2] == ("refused", kind), f"{kind} refused")
    assert (status, code) == (400, 50035) and reason in text  # discord.py read Discord's error shape
    assert len(emulator.refused) == refused + 1 and reason in emulator.refused[-1]
    assert interaction.callback_type is None and interaction.modal is None


# ----------------------------------------------------------------------------- the rules one by one
def button(label: str = "Go", custom_id: str = "go", **extra: Any) -> dict:
    return {"type": 2, "style": 1, "label": label, "custom_id": custom_id, **extra}


def select(**extra: Any) -> dict:
    return {"type": 3, "custom_id": "pick", "options": [{"label": "0:10", "value": "10"}], **extra}


def row(*components: dict) -> dict:
    return {"type": ACTION_ROW, "components": list(components)}


GOOD_MESSAGE = [
    row(
        button("Reroll", "r"),
        button("Extend", "e"),
        {"type": 2, "style": 5, "label": "Docs", "url": "https://example.com"},
    ),
    row(select(placeholder="Redo from…", min_values=0, max_values=1)),
]

MESSAGE_RULES = {  # what breaks the good message -> words of the reason
    "six rows": (lambda m: m + [row(button(custom_id=f"x{i}")) for i in range(4)], "5 or fewer"),
    "empty row": (lambda m: m + [row()], "1 to 5 buttons or exactly one select"),
    "six buttons": (lambda m: [row(*(button(custom_id=f"b{i}") for i in range(6)))], "1 to 5 buttons"),
    "button and select": (lambda m: [row(button(), select())], "exactly one select"),
    "bare button": (lambda m: [button()], "not a top-level component"),
    "empty custom_id": (lambda m: [row(button(custom_id=""))], "custom_id: must be 1 to 100"),
    "long custom_id": (lambda m: [row(button(custom_id="x" * 101))], "custom_id: must be 1 to 100"),
    "shared custom_id": (lambda m: [row(button(custom_id="a")), row(select(custom_id="a"))], "used twice"),
    "long label": (lambda m: [row(button(label="x" * 81))], "label: Must be 80"),
    "link with custom_id": (
        lambda m: [row({"type": 2, "style": 5, "url": "https://x", "custom_id": "x"})],
        "a url and no custom_id",
    ),
    "link without url": (lambda m: [row({"type": 2, "style": 5, "label": "x"})], "a url and no custom_id"),
    "button with url": (lambda m: [row(button(url="https://x"))], "only link buttons have a url"),
    "no options": (lambda m: [row(select(options=[]))], "1 to 25 options"),
    "26 options": (
        lambda m: [row(select(options=[{"label": str(i), "value": str(i)} for i in range(26)]))],
        "1 to 25 options",
    ),
    "long option": (lambda m: [row(select(options=[{"label": "x" * 101, "value": "1"}]))], "100 or fewer"),
    "long description": (
        lambda m: [row(select(options=[{"label": "a", "value": "1", "description": "x" * 101}]))],
        "100 or fewer",
    ),
    "long placeholder": (lambda m: [row(select(placeholder="x" * 151))], "placeholder: Must be 150"),
    "26 values": (lambda m: [row(select(max_values=26))], "max_values 1 to 25"),
    "min over max": (lambda m: [row(select(min_values=3, max_values=2))], "min_values <= max_values"),
    "text input": (lambda m: [row({"type": 4, "style": 1, "custom_id": "t", "label": "t"})], "exactly one select"),
    "text display": (lambda m: [{"type": 10, "content": "hi"}], "not a top-level component"),
}


@pytest.mark.parametrize("rule", MESSAGE_RULES)
def test_message_component_rules(rule):
    assert component_problem(GOOD_MESSAGE) is None
    breaking, reason = MESSAGE_RULES[rule]
    problem = component_problem(breaking(copy.deepcopy(GOOD_MESSAGE)))
    assert problem is not None and reason in problem, problem


def test_components_v2_messages_take_layouts_up_to_40_components():
    container = {"type": 17, "components": [{"type": 10, "content": "a track"}, row(button())]}
    assert component_problem([container]) is not None  # only with the flag
    assert component_problem([container], COMPONENTS_V2) is None
    crowded = [{"type": 10, "content": str(i)} for i in range(41)]
    assert "at most 40" in component_problem(crowded, COMPONENTS_V2)


def text_input(**extra: Any) -> dict:
    return {"type": 4, "style": 1, "custom_id": "seconds", "label": "Seconds to add", "value": "30", **extra}


GOOD_MODAL = {
    "custom_id": "extend",
    "title": "Extend the track",
    "components": [
        row(text_input()),
        {
            "type": LABEL,
            "label": "New instruction",
            "description": "what to change",
            "component": text_input(custom_id="instruction", label=None, style=2),
        },
        {"type": 10, "content": "Say how."},
    ],
}

MODAL_RULES = {
    "no title": (lambda m: m | {"title": ""}, "title: must be 1 to 45"),
    "long title": (lambda m: m | {"title": "x" * 46}, "title: must be 1 to 45"),
    "long custom_id": (lambda m: m | {"custom_id": "x" * 101}, "custom_id: must be 1 to 100"),
    "no components": (lambda m: m | {"components": []}, "1 to 5 components"),
    "six components": (
        lambda m: m | {"components": [row(text_input(custom_id=str(i))) for i in range(6)]},
        "1 to 5 components",
    ),
    "button": (lambda m: m | {"components": [row(button())]}, "exactly one text input"),
    "two inputs in a row": (
        lambda m: m | {"components": [row(text_input(), text_input(custom_id="b"))]},
        "exactly one text input",
    ),
    "row input without label": (lambda m: m | {"components": [row(text_input(label=None))]}, "needs a label"),
    "long input label": (lambda m: m | {"components": [row(text_input(label="x" * 46))]}, "label at most 45"),
    "long placeholder": (
        lambda m: m | {"components": [row(text_input(placeholder="x" * 101))]},
        "placeholder at most 100",
    ),
    "long value": (lambda m: m | {"components": [row(text_input(value="x" * 4001))]}, "value at most 4000"),
    "max_length over 4000": (lambda m: m | {"components": [row(text_input(max_length=4001))]}, "max_length 1 to 4000"),
    "negative min_length": (lambda m: m | {"components": [row(text_input(min_length=-1))]}, "min_length must be 0"),
    "long label component": (
        lambda m: m | {"components": [{"type": LABEL, "label": "x" * 46, "component": text_input()}]},
        "45 or fewer",
    ),
    "label without component": (lambda m: m | {"components": [{"type": LABEL, "label": "x"}]}, "only text inputs"),
    "shared custom_id": (lambda m: m | {"components": [row(text_input()), row(text_input())]}, "used twice"),
    "unknown style": (lambda m: m | {"components": [row(text_input(style=3))]}, "short (1) or paragraph (2)"),
}


@pytest.mark.parametrize("rule", MODAL_RULES)
def test_modal_rules(rule):
    assert modal_problem(GOOD_MODAL) is None
    breaking, reason = MODAL_RULES[rule]
    problem = modal_problem(breaking(copy.deepcopy(GOOD_MODAL)))
    assert problem is not None and reason in problem, problem
