"""A loopback Discord: enough REST, gateway and CDN for discord.py to run the bot end to end in tests.

It speaks the real wire formats (JSON over HTTP with `Content-Type: application/json`, multipart
uploads with `payload_json`, plain-text gateway frames) on 127.0.0.1 only, and records everything the
bot sends so tests can assert on what a user would see: which replies were ephemeral, when an
interaction was deferred, what a message pinged, which files it carried.

Interaction semantics modelled after Discord's:
- a callback must arrive within 3 s of dispatch and only once;
- a deferred reply is a "thinking" message whose visibility is fixed at defer time; the first
  follow-up after the defer replaces it and inherits that visibility;
- `expire_tokens()` makes webhook calls fail like an expired interaction token (401/404);
- messages over Discord's size limits (2 000 content, 1 024 per embed field, 6 000 per message)
  are refused with 400 Invalid Form Body, and recorded in `refused`;
- so are messages and modals that break Discord's component rules (`component_problem`,
  `modal_problem`), checked against discord.com/developers/docs/components/reference;
- voice (tests/voice_server.py): voice and stage channels with the bot's permissions in them, users
  sitting in them (voice states in the guild payload, VOICE_STATE_UPDATE when they move); the bot's
  gateway op 4 is answered with VOICE_STATE_UPDATE and a VOICE_SERVER_UPDATE pointing at the loopback
  voice server (joining a stage, it is suppressed like any listener), and its PATCH of its own voice
  state (un-suppressing itself, or asking to speak) is recorded and applied;
- message components are kept and sent back in message payloads; `click()` and `choose()` use a
  button or a select like a user (MESSAGE_COMPONENT interactions, refused on disabled components),
  `submit_modal()` fills in a modal the bot opened (MODAL_SUBMIT). Callback types 6 (deferred
  update) and 7 (update) act on the message the component is on; type 9 opens a modal;
- users post messages too (`post_message()`, `post_voice_message()`: attachments on the CDN, a voice
  message flagged and described as a phone sends it), and `context_menu()` runs a message command on
  one (APPLICATION_COMMAND of data.type 3 with target_id and resolved.messages);
- `autocomplete()` types into an option (APPLICATION_COMMAND_AUTOCOMPLETE); the bot answers with
  callback type 8, whose choices must keep Discord's limits (`choices_problem`);
- synced commands must keep Discord's rules (`command_problem`), or the sync is refused.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web
from voice_server import VoiceServer

EPHEMERAL = 1 << 6
LOADING = 1 << 7
COMPONENTS_V2 = 1 << 15  # a message laid out by components alone (no content, no embeds)
MANAGE_GUILD = 1 << 5
IS_VOICE_MESSAGE = 1 << 13  # message flag of a voice message
MEMBER_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 15) | (1 << 31)  # view, send, attach files, use commands
CONNECT, SPEAK, MUTE_MEMBERS = 1 << 20, 1 << 21, 1 << 22
BOT_PERMISSIONS = MEMBER_PERMISSIONS | CONNECT | SPEAK | MUTE_MEMBERS  # the bot's role, server-wide
VOICE_CHANNEL, STAGE_CHANNEL = 2, 13

# Interaction types.
APPLICATION_COMMAND, MESSAGE_COMPONENT, APPLICATION_COMMAND_AUTOCOMPLETE, MODAL_SUBMIT = 2, 3, 4, 5

# Application command types.
CHAT_INPUT, USER_COMMAND, MESSAGE_COMMAND = 1, 2, 3

# Interaction callback types.
CHANNEL_MESSAGE = 4
DEFERRED_CHANNEL_MESSAGE = 5
DEFERRED_UPDATE_MESSAGE = 6
UPDATE_MESSAGE = 7
AUTOCOMPLETE_RESULT = 8
MODAL = 9
CALLBACKS_FOR = {  # which callback types Discord takes for which interaction type
    APPLICATION_COMMAND: {CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, MODAL},
    APPLICATION_COMMAND_AUTOCOMPLETE: {AUTOCOMPLETE_RESULT},
    MESSAGE_COMPONENT: {CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, DEFERRED_UPDATE_MESSAGE, UPDATE_MESSAGE, MODAL},
    MODAL_SUBMIT: {CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, DEFERRED_UPDATE_MESSAGE, UPDATE_MESSAGE},
}

# Component types and button styles.
ACTION_ROW, BUTTON, STRING_SELECT, TEXT_INPUT, LABEL = 1, 2, 3, 4, 18
SELECTS = {STRING_SELECT, 5, 6, 7, 8}  # string, user, role, mentionable, channel
LAYOUTS_V2 = {9, 10, 11, 12, 13, 14, 17}  # section, text display, thumbnail, media gallery, file, separator, container
TEXT_DISPLAY = 10
LINK, PREMIUM = 5, 6

# Option types of slash commands.
OPTION_STRING, OPTION_INTEGER, OPTION_NUMBER, OPTION_ATTACHMENT = 3, 4, 10, 11

_snowflakes = itertools.count(1_300_000_000_000_000_000)


def snowflake() -> int:
    return next(_snowflakes)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py parses a body as JSON only when the Content-Type is exactly this.
    return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def _invalid_form_body(reason: str) -> dict:
    """Discord's 400 body for `reason` ("path.to[0].field: what is wrong"): its `errors` nest by path, the way
    discord.py's HTTPException reads them ("In path.to.0.field: what is wrong")."""
    path, _, problem = reason.partition(": ")
    errors: dict = {"_errors": [{"code": "BASE_TYPE_INVALID", "message": problem}]}
    for key in reversed(re.findall(r"[^.\[\]]+", path)):
        errors = {key: errors}
    return {"message": "Invalid Form Body", "code": 50035, "errors": errors}


# ----------------------------------------------------------------------------- components
def _walk(component: dict, path: str) -> Iterator[tuple[str, dict]]:
    yield path, component
    for i, child in enumerate(component.get("components") or []):
        yield from _walk(child, f"{path}.components[{i}]")
    for key in ("component", "accessory"):  # a label's child; a section's button or thumbnail
        if component.get(key):
            yield from _walk(component[key], f"{path}.{key}")


def walk_components(components: list[dict], path: str = "components") -> Iterator[tuple[str, dict]]:
    """Every component with its path in the payload, depth first (rows, labels and containers, then what they hold)."""
    for i, component in enumerate(components):
        yield from _walk(component, f"{path}[{i}]")


def _numbered(components: list[dict]) -> list[dict]:
    """A copy in which every component has an `id`: Discord numbers the ones sent without, skipping ids in use."""
    components = copy.deepcopy(components)
    used = {component.get("id") for _, component in walk_components(components)}
    fresh = (n for n in itertools.count(1) if n not in used)
    for _, component in walk_components(components):
        if not component.get("id"):
            component["id"] = next(fresh)
    return components


def _length_outside(text: str | None, most: int, least: int = 0) -> bool:
    return text is not None and not least <= len(text) <= most


def _number_outside(number: int | None, low: int, high: int) -> bool:
    return number is not None and not low <= number <= high


def _problem_with(component: dict, path: str, in_modal: bool) -> str | None:
    """What Discord would refuse about one component (what it holds is checked on its own)."""
    kind, custom_id, style = component.get("type"), component.get("custom_id"), component.get("style")
    interactive = kind in SELECTS or kind == TEXT_INPUT or (kind == BUTTON and style not in (LINK, PREMIUM))
    if interactive and (not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 100):
        return f"{path}.custom_id: must be 1 to 100 characters."
    if kind == ACTION_ROW:
        children = component.get("components") or []
        kinds = [child.get("type") for child in children]
        if in_modal:
            if kinds != [TEXT_INPUT]:
                return f"{path}.components: an action row in a modal holds exactly one text input."
            if not children[0].get("label"):
                return f"{path}.components[0].label: a text input in an action row needs a label."
        elif not ((1 <= len(kinds) <= 5 and set(kinds) == {BUTTON}) or (len(kinds) == 1 and kinds[0] in SELECTS)):
            return f"{path}.components: an action row holds 1 to 5 buttons or exactly one select."
    elif kind == BUTTON:
        if in_modal:
            return f"{path}: modals hold no buttons."
        if _length_outside(component.get("label"), 80):
            return f"{path}.label: Must be 80 or fewer in length."
        if style == LINK:
            if not component.get("url") or custom_id is not None:
                return f"{path}: a link button has a url and no custom_id."
            if _length_outside(component["url"], 512):
                return f"{path}.url: Must be 512 or fewer in length."
        elif style == PREMIUM:
            if not component.get("sku_id") or any(
                component.get(k) is not None for k in ("custom_id", "label", "url", "emoji")
            ):
                return f"{path}: a premium button has a sku_id and no custom_id, label, url or emoji."
        elif style not in (1, 2, 3, 4):
            return f"{path}.style: unknown button style {style}."
        elif component.get("url") is not None or component.get("sku_id") is not None:
            return f"{path}: only link buttons have a url, only premium buttons a sku_id."
    elif kind in SELECTS:
        if _length_outside(component.get("placeholder"), 150):
            return f"{path}.placeholder: Must be 150 or fewer in length."
        least, most = component.get("min_values"), component.get("max_values")
        at_least, at_most = 1 if least is None else least, 1 if most is None else most  # Discord's defaults
        if _number_outside(least, 0, 25) or _number_outside(most, 1, 25) or at_least > at_most:
            return f"{path}: min_values must be 0 to 25, max_values 1 to 25, and min_values <= max_values."
        if kind == STRING_SELECT:
            options = component.get("options") or []
            if not 1 <= len(options) <= 25:
                return f"{path}.options: a select holds 1 to 25 options."
            for i, option in enumerate(options):
                if any(_length_outside(option.get(key), 100) for key in ("label", "value", "description")):
                    return f"{path}.options[{i}]: label, value and description must be 100 or fewer in length."
    elif kind == TEXT_INPUT:
        if not in_modal:
            return f"{path}: text inputs belong in modals."
        if style not in (1, 2):
            return f"{path}.style: a text input is short (1) or paragraph (2)."
        if (
            _length_outside(component.get("label"), 45)
            or _length_outside(component.get("placeholder"), 100)
            or _length_outside(component.get("value"), 4000)
        ):
            return f"{path}: label at most 45, placeholder at most 100, value at most 4000 characters."
        if _number_outside(component.get("min_length"), 0, 4000) or _number_outside(
            component.get("max_length"), 1, 4000
        ):
            return f"{path}: min_length must be 0 to 4000, max_length 1 to 4000."
    elif kind == LABEL:
        if not in_modal:
            return f"{path}: labels belong in modals."
        if not isinstance(component.get("label"), str) or _length_outside(component["label"], 45):
            return f"{path}.label: required, 45 or fewer in length."
        if _length_outside(component.get("description"), 100):
            return f"{path}.description: Must be 100 or fewer in length."
        if (component.get("component") or {}).get("type") != TEXT_INPUT:
            return f"{path}.component: the emulator models only text inputs in labels."  # Discord takes selects too
    elif kind not in LAYOUTS_V2:
        return f"{path}.type: unknown component type {kind}."
    return None


def _problem_in(components: list[dict], in_modal: bool) -> str | None:
    custom_ids: set[str] = set()
    for path, component in walk_components(components):
        if problem := _problem_with(component, path, in_modal):
            return problem
        custom_id = component.get("custom_id")
        if custom_id in custom_ids:
            return f"{path}.custom_id: {custom_id!r} is used twice; custom_ids are unique within a message or modal."
        if custom_id is not None:
            custom_ids.add(custom_id)
    return None


def component_problem(components: list[dict] | None, flags: int = 0) -> str | None:
    """What Discord's Invalid Form Body would name about a message's components, or None."""
    components = components or []
    if flags & COMPONENTS_V2:
        if sum(1 for _ in walk_components(components)) > 40:
            return "components: a message holds at most 40 components in all."
        allowed = {ACTION_ROW} | LAYOUTS_V2
    else:
        if len(components) > 5:
            return "components: Must be 5 or fewer in length."
        allowed = {ACTION_ROW}
    for i, component in enumerate(components):
        if component.get("type") not in allowed:
            return f"components[{i}].type: {component.get('type')} is not a top-level component here."
    return _problem_in(components, in_modal=False)


def modal_problem(data: dict) -> str | None:
    """What Discord's Invalid Form Body would name about a modal (callback type 9), or None."""
    if _length_outside(data.get("title") or "", 45, least=1):
        return "title: must be 1 to 45 characters."
    if _length_outside(data.get("custom_id") or "", 100, least=1):
        return "custom_id: must be 1 to 100 characters."
    components = data.get("components") or []
    if not 1 <= len(components) <= 5:
        return "components: a modal holds 1 to 5 components."
    for i, component in enumerate(components):
        if component.get("type") not in (ACTION_ROW, LABEL, TEXT_DISPLAY):
            return f"components[{i}].type: a modal holds action rows, labels and text displays."
    return _problem_in(components, in_modal=True)


CHAT_INPUT_NAME = re.compile(r"[-_'\w]{1,32}")  # Discord's rule, less its extra scripts (Devanagari, Thai)
AUTOCOMPLETING = {OPTION_STRING, OPTION_INTEGER, OPTION_NUMBER}


def command_problem(command: dict, path: str) -> str | None:
    """What Discord would refuse about one command of a bulk sync, or None (its rules for names,
    descriptions and options; a context menu has neither description nor options)."""
    kind, name, description = command.get("type", CHAT_INPUT), command.get("name") or "", command.get("description")
    if kind in (USER_COMMAND, MESSAGE_COMMAND):
        if _length_outside(name, 32, least=1):
            return f"{path}.name: must be 1 to 32 characters."
        if description or command.get("options"):
            return f"{path}: a user or message command has no description and no options."
        return None
    if kind != CHAT_INPUT:
        return f"{path}.type: unknown command type {kind}."
    options = command.get("options") or []
    if len(options) > 25:
        return f"{path}.options: Must be 25 or fewer in length."
    for i, option in enumerate([command, *options]):
        where = path if i == 0 else f"{path}.options[{i - 1}]"
        if not CHAT_INPUT_NAME.fullmatch(option.get("name") or "") or option["name"] != option["name"].lower():
            return f"{where}.name: 1 to 32 lowercase letters, digits, '-', '_' or \"'\"."
        if _length_outside(option.get("description") or "", 100, least=1):
            return f"{where}.description: must be 1 to 100 characters."
    for i, option in enumerate(options):
        if option.get("autocomplete") and (option.get("choices") or option.get("type") not in AUTOCOMPLETING):
            return f"{path}.options[{i}].autocomplete: only string and number options without choices autocomplete."
    required = [bool(option.get("required")) for option in options]
    if required != sorted(required, reverse=True):
        return f"{path}.options: required options must come before optional ones."
    return None


def choices_problem(data: dict) -> str | None:
    """What Discord would refuse about an autocomplete answer (callback type 8), or None."""
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) > 25:
        return "choices: a list of at most 25 choices."
    for i, choice in enumerate(choices):
        value = choice.get("value")
        if (
            _length_outside(choice.get("name"), 100, least=1)
            or value is None
            or (isinstance(value, str) and _length_outside(value, 100, least=1))
        ):
            return f"choices[{i}]: name and a string value must be 1 to 100 characters."
    return None


@dataclass
class FakeUser:
    id: int
    name: str
    manage_guild: bool = False

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def payload(self, bot: bool = False) -> dict:
        return {
            "id": str(self.id),
            "username": self.name,
            "global_name": self.name,
            "discriminator": "0",
            "avatar": None,
            "bot": bot,
            "public_flags": 0,
        }


@dataclass
class SentFile:
    filename: str
    data: bytes
    content_type: str | None


@dataclass
class Message:
    """A message as users see it, with the history of its edits."""

    id: int
    channel_id: int
    via: str  # "response" (interaction reply / thinking), "followup", "channel" (the bot's), or "user"
    content: str = ""
    embeds: list[dict] = field(default_factory=list)
    allowed_mentions: dict | None = None
    flags: int = 0
    files: list[SentFile] = field(default_factory=list)
    components: list[dict] = field(default_factory=list)  # as Discord returns them (every one with an id)
    interaction_id: int | None = None
    deleted: bool = False
    history: list[dict] = field(default_factory=list)  # every state the message had, oldest first
    created_at: float = field(default_factory=time.monotonic)
    author: FakeUser | None = None  # who posted a "user" message; the bot's messages have none
    uploads: list[dict] = field(default_factory=list)  # a user's attachments, as Discord describes them

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def thinking(self) -> bool:
        return bool(self.flags & LOADING)

    def text(self) -> str:
        """Content plus every embed's visible text: what a reader sees."""
        parts = [self.content]
        for embed in self.embeds:
            parts += [embed.get("title", ""), embed.get("description", "")]
            for f in embed.get("fields", []):
                parts += [f.get("name", ""), f.get("value", "")]
            parts.append(embed.get("footer", {}).get("text", ""))
        return "\n".join(p for p in parts if p)

    def apply(self, body: dict, files: list[SentFile]) -> None:
        if "content" in body:
            self.content = body["content"] or ""
        if "embeds" in body:
            self.embeds = body["embeds"] or []
        if "allowed_mentions" in body:
            self.allowed_mentions = body["allowed_mentions"]
        if "attachments" in body or files:
            kept = {str(a.get("id")) for a in body.get("attachments", []) if "filename" not in a}
            self.files = [f for i, f in enumerate(self.files) if str(i) in kept] + files
        if "components" in body:
            self.components = _numbered(body["components"] or [])
        self.flags |= int(body.get("flags") or 0) & COMPONENTS_V2  # Discord: once set, never removed
        self.history.append(
            {
                "content": self.content,
                "embeds": self.embeds,
                "flags": self.flags,
                "allowed_mentions": self.allowed_mentions,
                "files": [f.filename for f in self.files],
                "components": self.components,
                "at": time.monotonic(),
            }
        )

    def payload(self, author: dict, base_url: str) -> dict:
        return {
            "id": str(self.id),
            "channel_id": str(self.channel_id),
            "author": author,
            "type": 0,
            "content": self.content,
            "embeds": self.embeds,
            "flags": self.flags,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "pinned": False,
            "components": self.components,
            "attachments": self.uploads
            + [
                {
                    "id": str(i),
                    "filename": f.filename,
                    "size": len(f.data),
                    "content_type": f.content_type,
                    "url": f"{base_url}/cdn/sent/{self.id}/{i}",
                    "proxy_url": f"{base_url}/cdn/sent/{self.id}/{i}",
                }
                for i, f in enumerate(self.files)
            ],
        }


@dataclass
class ModalInput:
    """A text input of a modal, as the user sees it."""

    custom_id: str
    label: str  # the Label's text, or the input's own label when it sits in an action row
    value: str  # the prefilled text ("" if none)
    required: bool
    min_length: int
    max_length: int


@dataclass
class Modal:
    """A modal the bot opened (callback type 9)."""

    custom_id: str
    title: str
    inputs: list[ModalInput]
    components: list[dict]  # as sent (numbered): a submission mirrors their layout

    @classmethod
    def from_payload(cls, data: dict) -> Modal:
        components = _numbered(data["components"])
        inputs = []
        for component in components:
            if component["type"] == ACTION_ROW:
                text_input = component["components"][0]
                label = text_input["label"]
            elif component["type"] == LABEL:
                text_input, label = component["component"], component["label"]
            else:
                continue  # text display
            inputs.append(
                ModalInput(
                    text_input["custom_id"],
                    label,
                    text_input.get("value") or "",
                    text_input.get("required", True),
                    text_input.get("min_length") or 0,
                    text_input.get("max_length") or 4000,
                )
            )
        return cls(data["custom_id"], data["title"], inputs, components)

    def input(self, key: str) -> ModalInput:
        """The input with this custom_id, else the one with this label."""
        found = next((i for i in self.inputs if i.custom_id == key), None) or next(
            (i for i in self.inputs if i.label == key), None
        )
        if found is None:
            raise AssertionError(
                f"modal {self.title!r} has no input {key!r}; its inputs: "
                f"{[(i.label, i.custom_id) for i in self.inputs]}"
            )
        return found

    def submission(self, values: dict[str, str]) -> list[dict]:
        """A MODAL_SUBMIT's components as Discord sends them: the modal's rows or labels, each input with its value."""

        def answer(text_input: dict) -> dict:
            return {
                "type": TEXT_INPUT,
                "id": text_input["id"],
                "custom_id": text_input["custom_id"],
                "value": values[text_input["custom_id"]],
            }

        submitted = []
        for component in self.components:
            if component["type"] == ACTION_ROW:
                submitted.append(
                    {"type": ACTION_ROW, "id": component["id"], "components": [answer(component["components"][0])]}
                )
            elif component["type"] == LABEL:
                submitted.append({"type": LABEL, "id": component["id"], "component": answer(component["component"])})
            else:
                submitted.append({"type": component["type"], "id": component["id"]})
        return submitted


@dataclass
class Interaction:
    id: int
    token: str
    user: FakeUser
    channel_id: int
    command: str  # the slash command's name; for a component or a modal submission, its custom_id
    dispatched_at: float
    attachment_size_limit: int
    type: int = APPLICATION_COMMAND  # or MESSAGE_COMPONENT, MODAL_SUBMIT
    message: Message | None = None  # the message whose component was used (also for a modal opened from one)
    modal: Modal | None = None  # the modal the bot answered with (callback type 9)
    callback_type: int | None = None
    callback_at: float | None = None
    # The original response (or the deferred "thinking" message); after callback type 6 or 7, the message
    # whose component was used, which "@original" then edits.
    response: Message | None = None
    followups: list[Message] = field(default_factory=list)
    callback_errors: list[str] = field(default_factory=list)
    choices: list[dict] | None = None  # an autocomplete's answer (callback type 8)

    @property
    def ack_seconds(self) -> float | None:
        return None if self.callback_at is None else self.callback_at - self.dispatched_at

    @property
    def deferred(self) -> bool:
        return self.callback_type == DEFERRED_CHANNEL_MESSAGE

    def visible_messages(self) -> list[Message]:
        return [m for m in [self.response, *self.followups] if m is not None and not m.deleted]


class DiscordEmulator:
    def __init__(self, attachment_size_limit: int = 10 * 1024 * 1024, valid_token: str | None = None) -> None:
        self.application_id = snowflake()
        self.bot_user = FakeUser(self.application_id, "MTM Bot")
        self.guild_id = snowflake()
        self.channel_id = snowflake()
        self.attachment_size_limit = attachment_size_limit
        self.valid_token = valid_token  # None: any token logs in
        self.token: str | None = None  # the token the bot authenticated with
        self.interactions: dict[int, Interaction] = {}
        self.messages: list[Message] = []
        self.commands: dict[str, list[dict]] = {}  # "global" or guild id -> the synced command list
        self.cdn_files: dict[str, tuple[bytes, str | None]] = {}
        self.cdn_downloads: list[str] = []
        self.refused: list[str] = []  # messages and modals refused for breaking Discord's size or component rules
        self.identifies = 0
        self.resumes = 0
        self.expired_tokens: dict[str, int] = {}  # token -> the status its webhook calls get
        self.bot_role_id = snowflake()
        self.voice_channels: list[dict] = []  # channel payloads (add_voice_channel)
        self.voice_states: dict[int, dict] = {}  # user id -> voice state payload: who sits where
        self.voice_server: VoiceServer | None = None  # start_voice()
        self.voice_gateway: list[dict] = []  # the bot's gateway op 4 payloads (join, move, leave), in order
        self.voice_state_patches: list[dict] = []  # the bot's PATCHes of its own voice state
        self.session_id = ""  # the bot's gateway session (READY)
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # ----------------------------------------------------------------------------- lifecycle
    async def start(self, port: int = 0) -> DiscordEmulator:
        """Serve on 127.0.0.1:`port` (0: any free port)."""
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._notify_after])
        r = app.router
        r.add_get("/gateway", self._gateway_ws)
        r.add_get("/api/v10/gateway", self._get_gateway)
        r.add_get("/api/v10/gateway/bot", self._get_gateway_bot)
        r.add_get("/api/v10/users/@me", self._get_me)
        r.add_get("/api/v10/oauth2/applications/@me", self._get_application)
        r.add_route("*", "/api/v10/applications/{app}/commands", self._commands)
        r.add_route("*", "/api/v10/applications/{app}/guilds/{guild}/commands", self._commands)
        r.add_post("/api/v10/interactions/{id}/{token}/callback", self._callback)
        r.add_post("/api/v10/webhooks/{app}/{token}", self._followup)
        r.add_route("*", "/api/v10/webhooks/{app}/{token}/messages/{message}", self._webhook_message)
        r.add_post("/api/v10/channels/{channel}/messages", self._channel_message)
        r.add_patch("/api/v10/channels/{channel}/messages/{message}", self._edit_channel_message)
        r.add_patch("/api/v10/guilds/{guild}/voice-states/@me", self._patch_my_voice_state)
        r.add_get("/cdn/attachments/{key}/{filename}", self._cdn)
        r.add_get("/cdn/sent/{message}/{index}", self._cdn_sent)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def start_voice(self) -> VoiceServer:
        """Serve voice too: VOICE_SERVER_UPDATE then points at a loopback voice server."""
        self.voice_server = await VoiceServer().start(self._notify)
        return self.voice_server

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.voice_server is not None:
            await self.voice_server.stop()

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://{self.base_url.removeprefix('http://')}/gateway"

    def env(self, token: str = "emulator-token") -> dict[str, str]:
        """The environment variables that point a bot at this emulator."""
        return {
            "DISCORD_TOKEN": token,
            "DISCORD_API_BASE": self.api_base,
            "DISCORD_GATEWAY_URL": self.gateway_url,
            "MTM_GUILD_ID": str(self.guild_id),
        }

    # ----------------------------------------------------------------------------- test API
    def user(self, name: str, manage_guild: bool = False) -> FakeUser:
        return FakeUser(snowflake(), name, manage_guild)

    def expire_tokens(self, *interactions: Interaction, status: int = 404) -> None:
        """From now on webhook calls with these interactions' tokens (all, if none given) fail like an
        expired token: 401 Invalid Webhook Token or 404 Unknown Webhook."""
        for interaction in interactions or self.interactions.values():
            self.expired_tokens[interaction.token] = status

    def add_voice_channel(self, name: str, stage: bool = False, deny_bot: int = 0) -> int:
        """A voice (or stage) channel in which the bot's role is denied `deny_bot` (permission bits); its id.
        Call before the bot connects: it is part of the guild the bot receives."""
        channel_id = snowflake()
        overwrites = [{"id": str(self.bot_role_id), "type": 0, "allow": "0", "deny": str(deny_bot)}] if deny_bot else []
        self.voice_channels.append(
            {
                "id": str(channel_id),
                "type": STAGE_CHANNEL if stage else VOICE_CHANNEL,
                "name": name,
                "position": len(self.voice_channels) + 1,
                "guild_id": str(self.guild_id),
                "permission_overwrites": overwrites,
                "nsfw": False,
                "parent_id": None,
                "bitrate": 64000,
                "user_limit": 0,
                "rtc_region": None,
            }
        )
        return channel_id

    def is_stage(self, channel_id: int | str | None) -> bool:
        return any(c["id"] == str(channel_id) and c["type"] == STAGE_CHANNEL for c in self.voice_channels)

    async def join_voice(self, user: FakeUser, channel_id: int) -> None:
        """`user` sits down in a voice or stage channel (on a stage, as a listener)."""
        state = self._voice_state(user, channel_id, f"user-session-{snowflake()}")
        self.voice_states[user.id] = state
        await self.dispatch("VOICE_STATE_UPDATE", state)

    def voice_session(self, channel_id: int):
        """The bot's latest voice session in this channel (tests/voice_server.py), or None."""
        sessions = [] if self.voice_server is None else self.voice_server.sessions
        return next((s for s in reversed(sessions) if s.channel_id == channel_id), None)

    @property
    def connected(self) -> bool:
        return bool(self._sockets)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
        """Wait until `predicate()` is truthy (re-checked whenever the emulator records something)."""

        async def check() -> Any:
            async with self._changed:
                while not (value := predicate()):
                    await self._changed.wait()
                return value

        try:
            return await asyncio.wait_for(check(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None

    async def slash(
        self,
        user: FakeUser,
        command: str,
        options: dict[str, Any] | None = None,
        attachment: tuple[bytes, str, str | None] | None = None,
        declared_size: int | None = None,
        attachment_size_limit: int | None = None,
        attachments: dict[str, tuple] | None = None,
        guild_id: int | None = None,
    ) -> Interaction:
        """Dispatch a slash command as if `user` ran it; `attachment` = (bytes, filename, content_type)
        becomes the `audio` option, served from this emulator's CDN (with `declared_size` if given).
        `attachments` adds attachment options by name: (bytes, filename, content_type[, declared_size]).
        `guild_id` sends it from another server than the emulated guild (the bot then knows that guild
        only from the interaction, and its commands must have been synced globally)."""
        options = dict(options or {})
        files = dict(attachments or {})
        if attachment is not None:
            files["audio"] = (*attachment, declared_size)
        resolved: dict = {"attachments": {}} if files else {}
        for option, (data, filename, content_type, *size) in files.items():
            meta = self._upload(data, filename, content_type, size[0] if size else None)
            resolved["attachments"][meta["id"]] = meta
            options[option] = int(meta["id"])
        option_list = []
        for name, value in options.items():
            kind = OPTION_ATTACHMENT if name in files else OPTION_INTEGER if isinstance(value, int) else OPTION_STRING
            option_list.append(
                {"name": name, "type": kind, "value": str(value) if kind == OPTION_ATTACHMENT else value}
            )
        registered = self._synced(command)
        interaction = self._open_interaction(user, APPLICATION_COMMAND, command, attachment_size_limit)
        guild = str(self.guild_id if guild_id is None else guild_id)
        await self._dispatch_interaction(
            interaction,
            {
                "id": registered["id"],
                "name": command,
                "type": CHAT_INPUT,
                "options": option_list,
                "resolved": resolved,
                "guild_id": guild,
            },
            guild,
        )
        return interaction

    async def autocomplete(
        self,
        user: FakeUser,
        command: str,
        option: str,
        typed: str,
        options: dict[str, Any] | None = None,
        guild_id: int | None = None,
    ) -> list[dict]:
        """`user` types `typed` into `option` of /`command` (string and integer `options` already filled in) in
        this guild or in `guild_id`; returns the choices the bot answered with (Discord waits 3 s for them)."""
        registered = self._synced(command)
        declared = next((o for o in registered.get("options", []) if o["name"] == option), None)
        if declared is None or not declared.get("autocomplete"):
            raise AssertionError(f"/{command}'s option {option!r} does not autocomplete; Discord sends nothing")
        filled = [
            {"name": name, "type": OPTION_INTEGER if isinstance(value, int) else OPTION_STRING, "value": value}
            for name, value in (options or {}).items()
        ]
        interaction = self._open_interaction(user, APPLICATION_COMMAND_AUTOCOMPLETE, command)
        guild = str(self.guild_id if guild_id is None else guild_id)
        focused = {"name": option, "type": declared["type"], "value": typed, "focused": True}
        await self._dispatch_interaction(
            interaction,
            {
                "id": registered["id"],
                "name": command,
                "type": CHAT_INPUT,
                "options": [*filled, focused],
                "guild_id": guild,
            },
            guild,
        )
        refused = len(self.refused)
        await self.wait_for(
            lambda: interaction.callback_type is not None or len(self.refused) > refused,
            3.0,
            f"suggestions for /{command} {option}",
        )
        assert not interaction.callback_errors and len(self.refused) == refused, (
            interaction.callback_errors,
            self.refused[refused:],
        )
        return interaction.choices

    def post_message(
        self,
        user: FakeUser,
        content: str = "",
        attachments: list[tuple[bytes, str, str | None]] = (),
        flags: int = 0,
        **attachment_fields: Any,
    ) -> Message:
        """`user` posts a message in the channel; its `attachments` (bytes, filename, content_type) are served from
        the CDN, each described with `attachment_fields` too (a voice message's duration_secs and waveform)."""
        message = Message(
            snowflake(),
            self.channel_id,
            "user",
            content=content,
            flags=flags,
            author=user,
            uploads=[self._upload(*attachment, **attachment_fields) for attachment in attachments],
        )
        self.messages.append(message)
        return message

    def post_voice_message(self, user: FakeUser, ogg: bytes, duration_secs: float, waveform: bytes) -> Message:
        """A voice message as Discord's apps send it: no text, one `voice-message.ogg` (OGG/Opus, audio/ogg)
        with its length and its waveform (one amplitude byte per sample, base64), flag IS_VOICE_MESSAGE."""
        return self.post_message(
            user,
            attachments=[(ogg, "voice-message.ogg", "audio/ogg")],
            flags=IS_VOICE_MESSAGE,
            duration_secs=duration_secs,
            waveform=base64.b64encode(waveform).decode(),
        )

    async def context_menu(self, user: FakeUser, message: Message, name: str) -> Interaction:
        """`user` runs the message command `name` (Apps → name) on `message`."""
        registered = self._synced(name, MESSAGE_COMMAND)
        author = message.author.payload() if message.author else self.bot_user.payload(bot=True)
        interaction = self._open_interaction(user, APPLICATION_COMMAND, name)
        target = str(message.id)
        await self._dispatch_interaction(
            interaction,
            {
                "id": registered["id"],
                "name": name,
                "type": MESSAGE_COMMAND,
                "target_id": target,
                "resolved": {"messages": {target: message.payload(author, self.base_url)}},
                "guild_id": str(self.guild_id),
            },
        )
        return interaction

    async def click(self, user: FakeUser, message: Message, label: str) -> Interaction:
        """`user` clicks the button whose label contains `label` (case-sensitive) on `message`."""
        buttons = [c for _, c in walk_components(message.components) if c["type"] == BUTTON]
        matching = [b for b in buttons if label in (b.get("label") or "")]
        if len(matching) != 1:
            raise AssertionError(
                f"{'no' if not matching else 'more than one'} button labelled with {label!r} on "
                f"message {message.id}; its buttons: {[b.get('label') for b in buttons]}"
            )
        (button,) = matching
        if button.get("style") in (LINK, PREMIUM):
            raise AssertionError(
                f"button {button.get('label')!r} opens a link or a purchase: the bot gets no interaction"
            )
        return await self._use_component(
            user, message, button, {"custom_id": button["custom_id"], "component_type": BUTTON, "id": button["id"]}
        )

    async def choose(self, user: FakeUser, message: Message, value: str, placeholder: str | None = None) -> Interaction:
        """`user` picks the option with this value in a select on `message` (the one whose placeholder contains
        `placeholder`, if given)."""
        selects = [
            c
            for _, c in walk_components(message.components)
            if c["type"] == STRING_SELECT and (placeholder is None or placeholder in (c.get("placeholder") or ""))
        ]
        matching = [s for s in selects if any(o.get("value") == value for o in s["options"])]
        if len(matching) != 1:
            offered = {s.get("placeholder"): [o.get("value") for o in s["options"]] for s in selects}
            raise AssertionError(
                f"{'no' if not matching else 'more than one'} select offers {value!r} on message "
                f"{message.id} (placeholder {placeholder!r}); its selects offer: {offered}"
            )
        (select,) = matching
        if select.get("min_values", 1) > 1:
            raise AssertionError(f"select {select.get('placeholder')!r} wants at least {select['min_values']} values")
        return await self._use_component(
            user,
            message,
            select,
            {"custom_id": select["custom_id"], "component_type": STRING_SELECT, "id": select["id"], "values": [value]},
        )

    async def submit_modal(self, user: FakeUser, interaction: Interaction, values: dict[str, str]) -> Interaction:
        """`user` submits the modal the bot answered `interaction` with; `values` by input label or custom_id,
        inputs not given keep their prefilled text. Waits for the bot's answer (Discord waits 3 s for it)."""
        if interaction.callback_type is None:
            left = max(0.0, interaction.dispatched_at + 3.0 - time.monotonic())
            await self.wait_for(
                lambda: interaction.callback_type is not None, left, f"the answer to {interaction.command}"
            )
        modal = interaction.modal
        if modal is None:
            raise AssertionError(
                f"the bot answered interaction {interaction.id} ({interaction.command}) with "
                f"callback type {interaction.callback_type}, not with a modal"
            )
        if user != interaction.user:
            raise AssertionError(f"modal {modal.title!r} was shown to {interaction.user.name}, not to {user.name}")
        answers = {text_input.custom_id: text_input.value for text_input in modal.inputs}
        answers.update({modal.input(key).custom_id: value for key, value in values.items()})
        for text_input in modal.inputs:  # Discord's client does not submit a modal that breaks these
            answer = answers[text_input.custom_id]
            if text_input.required and not answer:
                raise AssertionError(f"modal {modal.title!r}: {text_input.label!r} is required")
            if answer and not text_input.min_length <= len(answer) <= text_input.max_length:
                raise AssertionError(
                    f"modal {modal.title!r}: {text_input.label!r} takes {text_input.min_length} to "
                    f"{text_input.max_length} characters, got {len(answer)}"
                )
        submitted = self._open_interaction(user, MODAL_SUBMIT, modal.custom_id, message=interaction.message)
        await self._dispatch_interaction(
            submitted, {"custom_id": modal.custom_id, "components": modal.submission(answers)}
        )
        return submitted

    async def dispatch(self, event: str, data: dict) -> None:
        for ws in list(self._sockets):
            await ws.send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data}))

    async def reconnect(self) -> None:
        """Ask the bot to reconnect (op 7); discord.py then RESUMEs its session."""
        for ws in list(self._sockets):
            await ws.send_str(json.dumps({"op": 7, "d": None}))

    # ----------------------------------------------------------------------------- internals
    def _synced(self, name: str, kind: int = CHAT_INPUT) -> dict:
        """The command of this name and type the bot synced, to the emulated guild or globally."""
        synced = [
            c for c in self.commands.get(str(self.guild_id), []) + self.commands.get("global", []) if c["type"] == kind
        ]
        found = next((c for c in synced if c["name"] == name), None)
        if found is None:
            raise AssertionError(
                f"{name!r} (type {kind}) was never synced; synced: {sorted(c['name'] for c in synced)}"
            )
        return found

    def _upload(
        self, data: bytes, filename: str, content_type: str | None, declared_size: int | None = None, **fields: Any
    ) -> dict:
        """Put a user's file on the CDN; its attachment object as Discord sends it (with `declared_size`, if given)."""
        key = str(snowflake())
        self.cdn_files[key] = (data, content_type)
        url = f"{self.base_url}/cdn/attachments/{key}/{filename}"
        meta = {
            "id": key,
            "filename": filename,
            "size": len(data) if declared_size is None else declared_size,
            "url": url,
            "proxy_url": url,
            **fields,
        }
        if content_type is not None:
            meta["content_type"] = content_type
        return meta

    def _open_interaction(
        self,
        user: FakeUser,
        kind: int,
        command: str,
        attachment_size_limit: int | None = None,
        message: Message | None = None,
    ) -> Interaction:
        if not self._sockets:
            raise AssertionError("the bot is not connected to the gateway")
        limit = self.attachment_size_limit if attachment_size_limit is None else attachment_size_limit
        interaction = Interaction(
            snowflake(),
            f"itoken-{snowflake()}",
            user,
            self.channel_id,
            command,
            time.monotonic(),
            limit,
            type=kind,
            message=message,
        )
        self.interactions[interaction.id] = interaction
        return interaction

    async def _dispatch_interaction(self, interaction: Interaction, data: dict, guild: str | None = None) -> None:
        """INTERACTION_CREATE with what every interaction carries (discord.py reads all of it) around `data`."""
        guild = guild or str(self.guild_id)
        permissions = MEMBER_PERMISSIONS | (MANAGE_GUILD if interaction.user.manage_guild else 0)
        payload = {
            "id": str(interaction.id),
            "application_id": str(self.application_id),
            "type": interaction.type,
            "token": interaction.token,
            "version": 1,
            "guild_id": guild,
            "channel_id": str(interaction.channel_id),
            "channel": {**self._channel_payload(), "guild_id": guild},
            "member": {
                "user": interaction.user.payload(),
                "roles": [],
                "joined_at": _now_iso(),
                "deaf": False,
                "mute": False,
                "flags": 0,
                "permissions": str(permissions),
            },
            "data": data,
            "app_permissions": str(MEMBER_PERMISSIONS),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": guild},
            "context": 0,
            "attachment_size_limit": interaction.attachment_size_limit,
        }
        if interaction.message is not None:
            payload["message"] = interaction.message.payload(self.bot_user.payload(bot=True), self.base_url)
        await self.dispatch("INTERACTION_CREATE", payload)

    async def _use_component(self, user: FakeUser, message: Message, component: dict, data: dict) -> Interaction:
        name = component.get("label") or component.get("placeholder") or component["custom_id"]
        what = f"{name!r} on message {message.id}"
        if message.deleted:
            raise AssertionError(f"{what}: the message was deleted")
        source = self.interactions.get(message.interaction_id) if message.interaction_id else None
        if message.ephemeral and source is not None and source.user != user:
            raise AssertionError(f"{what}: the message is ephemeral, only {source.user.name} sees it")
        if component.get("disabled"):
            raise AssertionError(f"{what} is disabled: Discord does not let {user.name} use it")
        interaction = self._open_interaction(user, MESSAGE_COMPONENT, component["custom_id"], message=message)
        await self._dispatch_interaction(interaction, data)
        return interaction

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @web.middleware
    async def _notify_after(self, request: web.Request, handler):
        try:
            return await handler(request)
        finally:
            await self._notify()

    def _channel_payload(self) -> dict:
        return {
            "id": str(self.channel_id),
            "type": 0,
            "name": "music",
            "position": 0,
            "guild_id": str(self.guild_id),
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
        }

    def _guild_payload(self) -> dict:
        return {
            "id": str(self.guild_id),
            "name": "Emulated Guild",
            "icon": None,
            "owner_id": str(snowflake()),
            "roles": [
                {
                    "id": str(self.guild_id),
                    "name": "@everyone",
                    "permissions": str(MEMBER_PERMISSIONS),
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "flags": 0,
                },
                {
                    "id": str(self.bot_role_id),
                    "name": "MTM Bot",
                    "permissions": str(BOT_PERMISSIONS),
                    "position": 1,
                    "color": 0,
                    "hoist": False,
                    "managed": True,
                    "mentionable": False,
                    "flags": 0,
                },
            ],
            "channels": [self._channel_payload(), *self.voice_channels],
            "threads": [],
            "emojis": [],
            "stickers": [],
            "features": [],
            "members": [
                {
                    "user": self.bot_user.payload(bot=True),
                    "roles": [str(self.bot_role_id)],
                    "joined_at": _now_iso(),
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                }
            ],
            "member_count": 2,
            "voice_states": list(self.voice_states.values()),
            "presences": [],
            "large": False,
            "unavailable": False,
            "joined_at": _now_iso(),
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "system_channel_flags": 0,
            "afk_timeout": 300,
        }

    def _voice_state(self, user: FakeUser, channel_id: int | None, session_id: str, **flags) -> dict:
        member = {
            "user": user.payload(bot=user == self.bot_user),
            "joined_at": _now_iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "roles": [str(self.bot_role_id)] if user == self.bot_user else [],
        }
        return {
            "guild_id": str(self.guild_id),
            "channel_id": None if channel_id is None else str(channel_id),
            "user_id": str(user.id),
            "session_id": session_id,
            "deaf": False,
            "mute": False,
            "self_deaf": False,
            "self_mute": False,
            "self_video": False,
            "suppress": self.is_stage(channel_id),
            "request_to_speak_timestamp": None,
            "member": member,
            **flags,
        }

    async def _bot_voice(self, data: dict) -> None:
        """Discord's answer to gateway op 4: the bot's new voice state, and where its voice server is."""
        self.voice_gateway.append(data)
        channel_id = data.get("channel_id")
        state = self._voice_state(
            self.bot_user,
            channel_id,
            self.session_id,
            self_deaf=bool(data.get("self_deaf")),
            self_mute=bool(data.get("self_mute")),
        )
        if channel_id is None:
            self.voice_states.pop(self.bot_user.id, None)
        else:
            self.voice_states[self.bot_user.id] = state
        await self.dispatch("VOICE_STATE_UPDATE", state)
        if channel_id is not None and self.voice_server is not None:
            session = self.voice_server.open_session(
                self.guild_id, int(channel_id), self.bot_user.id, self.session_id, dave=not self.is_stage(channel_id)
            )
            await self.dispatch(
                "VOICE_SERVER_UPDATE",
                {"token": session.token, "guild_id": str(self.guild_id), "endpoint": self.voice_server.endpoint},
            )

    async def _patch_my_voice_state(self, request: web.Request) -> web.Response:
        """The bot un-suppresses itself on a stage (or asks to speak): recorded, applied, announced."""
        if not self._authorised(request):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        body = await request.json()
        self.voice_state_patches.append(body)
        state = self.voice_states.get(self.bot_user.id)
        if state is None or not self.is_stage(state["channel_id"]):
            return _json({"message": "Unknown Voice State", "code": 10065}, 404)
        state.update({key: body[key] for key in ("suppress", "request_to_speak_timestamp") if key in body})
        await self.dispatch("VOICE_STATE_UPDATE", state)
        return web.Response(status=204)

    def _authorised(self, request: web.Request) -> bool:
        return self.token is not None and request.headers.get("Authorization") == f"Bot {self.token}"

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        return _json(
            {
                "url": self.gateway_url,
                "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1},
            }
        )

    async def _get_me(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if (
            not auth.startswith("Bot ")
            or len(auth) <= 4
            or (self.valid_token is not None and auth != f"Bot {self.valid_token}")
        ):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        self.token = auth.removeprefix("Bot ")
        return _json(self.bot_user.payload(bot=True))

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json(
            {
                "id": str(self.application_id),
                "name": "MTM Bot",
                "description": "",
                "icon": None,
                "bot_public": False,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "flags": 0,
                "owner": FakeUser(snowflake(), "owner").payload(),
                "team": None,
                "summary": "",
            }
        )

    async def _commands(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        scope = request.match_info.get("guild", "global")
        if request.method == "PUT":
            commands = []
            synced = await request.json()
            self._refuse(next(filter(None, (command_problem(c, f"[{i}]") for i, c in enumerate(synced))), None))
            for command in synced:
                # Discord answers with every field: a context menu's description is "".
                commands.append(
                    {
                        "description": "",
                        **command,
                        "id": str(snowflake()),
                        "application_id": str(self.application_id),
                        "version": str(snowflake()),
                        "type": command.get("type", CHAT_INPUT),
                    }
                )
            self.commands[scope] = commands
        return _json(self.commands.get(scope, []))

    async def _gateway_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op, data = frame.get("op"), frame.get("d")
                if op == 1:  # HEARTBEAT
                    await ws.send_str(json.dumps({"op": 11}))
                elif op == 2:  # IDENTIFY
                    if data.get("token") != self.token:
                        await ws.close(code=4004, message=b"Authentication failed.")
                        break
                    self.identifies += 1
                    self._sockets.append(ws)
                    await self._send_ready(ws)
                elif op == 4:  # VOICE_STATE_UPDATE: the bot joins, moves or leaves voice
                    await self._bot_voice(data)
                elif op == 6:  # RESUME
                    self.resumes += 1
                    self._sockets.append(ws)
                    await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": next(self._seq), "d": {}}))
                await self._notify()
        finally:
            if ws in self._sockets:
                self._sockets.remove(ws)
            await self._notify()
        return ws

    async def _send_ready(self, ws: web.WebSocketResponse) -> None:
        self.session_id = f"session-{snowflake()}"
        ready = {
            "v": 10,
            "user": self.bot_user.payload(bot=True),
            "session_id": self.session_id,
            "resume_gateway_url": self.gateway_url,
            "guilds": [{"id": str(self.guild_id), "unavailable": True}],
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "shard": [0, 1],
        }
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": next(self._seq), "d": ready}))
        await ws.send_str(json.dumps({"op": 0, "t": "GUILD_CREATE", "s": next(self._seq), "d": self._guild_payload()}))

    async def _read_body(self, request: web.Request) -> tuple[dict, list[SentFile]]:
        """JSON body, or multipart with `payload_json` and `files[n]` parts."""
        if request.content_type != "multipart/form-data":
            return (await request.json() if request.can_read_body else {}), []
        body: dict = {}
        files: list[SentFile] = []
        reader = await request.multipart()
        async for part in reader:
            if part.name == "payload_json":
                body = json.loads(await part.text())
            elif part.filename is not None:
                files.append(SentFile(part.filename, bytes(await part.read()), part.headers.get("Content-Type")))
        return body, files

    @staticmethod
    def _too_big(body: dict) -> str | None:
        """What Discord's Invalid Form Body (50035) would name, or None: content over 2 000, embed
        titles over 256, descriptions over 4 096, fields over 25 / names over 256 / values over 1 024,
        over 6 000 characters of embed text, more than 10 embeds."""
        if len(body.get("content") or "") > 2000:
            return "content: Must be 2000 or fewer in length."
        embeds = body.get("embeds") or []
        if len(embeds) > 10:
            return "embeds: Must be 10 or fewer in length."
        total = 0
        for embed in embeds:
            fields = embed.get("fields", [])
            texts = [
                embed.get("title", ""),
                embed.get("description", ""),
                embed.get("footer", {}).get("text", ""),
                *(f.get("name", "") for f in fields),
                *(f.get("value", "") for f in fields),
            ]
            total += sum(len(t) for t in texts)
            if (
                len(embed.get("title", "")) > 256
                or len(embed.get("description", "")) > 4096
                or len(fields) > 25
                or any(len(f.get("name", "")) > 256 or len(f.get("value", "")) > 1024 for f in fields)
            ):
                return "embeds: an embed is over its size limits."
        return "embeds: Embed size exceeds maximum size of 6000" if total > 6000 else None

    def _refuse(self, reason: str | None) -> None:
        """Answer 400 Invalid Form Body naming `reason`, if there is one."""
        if reason is not None:
            self.refused.append(reason)
            raise web.HTTPBadRequest(
                body=json.dumps(_invalid_form_body(reason)).encode(), headers={"Content-Type": "application/json"}
            )

    def _check_message(self, body: dict, flags: int = 0) -> None:
        """Refuse a message (or an edit of one whose flags are `flags`) that breaks Discord's rules."""
        flags |= int(body.get("flags") or 0)
        components_only = flags & COMPONENTS_V2 and (body.get("content") or body.get("embeds"))
        self._refuse(
            self._too_big(body)
            or component_problem(body.get("components"), flags)
            or ("content: a message flagged IS_COMPONENTS_V2 holds no content or embeds." if components_only else None)
        )

    def _new_message(self, via: str, body: dict, files: list[SentFile], interaction: Interaction | None) -> Message:
        message = Message(
            snowflake(),
            self.channel_id if interaction is None else interaction.channel_id,
            via,
            flags=int(body.get("flags", 0)) & EPHEMERAL,
            interaction_id=None if interaction is None else interaction.id,
        )
        message.apply(body, files)
        self.messages.append(message)
        return message

    def _by_token(self, token: str) -> Interaction | None:
        return next((i for i in self.interactions.values() if i.token == token), None)

    def _webhook_refusal(self, request: web.Request) -> tuple[Interaction | None, web.Response | None]:
        interaction = self._by_token(request.match_info["token"])
        if interaction is None or request.match_info["app"] != str(self.application_id):
            return None, _json({"message": "Unknown Webhook", "code": 10015}, 404)
        if self.expired_tokens.get(interaction.token) == 401:
            return None, _json({"message": "Invalid Webhook Token", "code": 50027}, 401)
        if self.expired_tokens.get(interaction.token) == 404:
            return None, _json({"message": "Unknown Webhook", "code": 10015}, 404)
        return interaction, None

    async def _callback(self, request: web.Request) -> web.Response:
        interaction = self.interactions.get(int(request.match_info["id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        now = time.monotonic()
        if interaction.callback_type is not None:
            interaction.callback_errors.append("already acknowledged")
            return _json({"message": "Interaction has already been acknowledged.", "code": 40060}, 400)
        if now - interaction.dispatched_at > 3.0:
            interaction.callback_errors.append(f"too late ({now - interaction.dispatched_at:.1f} s)")
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        body, files = await self._read_body(request)
        kind, data = body["type"], body.get("data") or {}
        updates = kind in (DEFERRED_UPDATE_MESSAGE, UPDATE_MESSAGE)  # act on the message the component is on
        if kind not in CALLBACKS_FOR[interaction.type] or (updates and interaction.message is None):
            interaction.callback_errors.append(f"callback type {kind} for interaction type {interaction.type}")
            return _json(_invalid_form_body(f"type: callback type {kind} does not answer this interaction."), 400)
        if kind == MODAL:
            self._refuse(modal_problem(data))
        elif kind == AUTOCOMPLETE_RESULT:
            self._refuse(choices_problem(data))
        else:
            self._check_message(data, interaction.message.flags if updates else 0)
        interaction.callback_type, interaction.callback_at = kind, now
        answer = {"id": str(interaction.id), "type": interaction.type}
        if kind == MODAL:
            interaction.modal = Modal.from_payload(data)
        elif kind == AUTOCOMPLETE_RESULT:
            interaction.choices = data["choices"]
        if kind in (MODAL, AUTOCOMPLETE_RESULT):  # nothing is posted
            return _json({"interaction": answer, "resource": {"type": kind}})
        if updates:
            message = interaction.message
            if kind == UPDATE_MESSAGE:
                message.apply(data, files)
        else:
            message = self._new_message("response", data, files, interaction)
            if kind == DEFERRED_CHANNEL_MESSAGE:
                message.flags |= LOADING
        interaction.response = message
        if kind == DEFERRED_UPDATE_MESSAGE:  # nothing visible happens
            return _json({"interaction": answer, "resource": {"type": kind}})
        answer.update(
            {
                "response_message_id": str(message.id),
                "response_message_loading": message.thinking,
                "response_message_ephemeral": message.ephemeral,
            }
        )
        author = self.bot_user.payload(bot=True)
        return _json(
            {"interaction": answer, "resource": {"type": kind, "message": message.payload(author, self.base_url)}}
        )

    async def _followup(self, request: web.Request) -> web.Response:
        interaction, refusal = self._webhook_refusal(request)
        if refusal is not None:
            return refusal
        body, files = await self._read_body(request)
        self._check_message(body)
        original = interaction.response
        if original is not None and original.thinking and not original.deleted:
            # Discord: the first follow-up after a defer replaces "thinking", keeping its visibility.
            original.flags &= ~LOADING
            original.via = "followup"
            original.apply(body, files)
            message = original
        else:
            message = self._new_message("followup", body, files, interaction)
            interaction.followups.append(message)
        return _json(message.payload(self.bot_user.payload(bot=True), self.base_url))

    async def _webhook_message(self, request: web.Request) -> web.Response:
        interaction, refusal = self._webhook_refusal(request)
        if refusal is not None:
            return refusal
        key = request.match_info["message"]
        candidates = interaction.visible_messages()
        message = (
            interaction.response if key == "@original" else next((m for m in candidates if str(m.id) == key), None)
        )
        if message is None or message.deleted:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        if request.method == "DELETE":
            message.deleted = True
            return web.Response(status=204)
        if request.method == "PATCH":
            body, files = await self._read_body(request)
            self._check_message(body, message.flags)
            message.flags &= ~LOADING
            message.apply(body, files)
        return _json(message.payload(self.bot_user.payload(bot=True), self.base_url))

    async def _channel_message(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        if request.match_info["channel"] != str(self.channel_id):
            return _json({"message": "Unknown Channel", "code": 10003}, 404)
        body, files = await self._read_body(request)
        self._check_message(body)
        message = self._new_message("channel", body, files, None)
        return _json(message.payload(self.bot_user.payload(bot=True), self.base_url))

    async def _edit_channel_message(self, request: web.Request) -> web.Response:
        """PATCH a message through the channel (discord.py's Message.edit); ephemeral ones are not reachable so."""
        if not self._authorised(request):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        if request.match_info["channel"] != str(self.channel_id):
            return _json({"message": "Unknown Channel", "code": 10003}, 404)
        message = next((m for m in self.messages if str(m.id) == request.match_info["message"]), None)
        if message is None or message.deleted or message.ephemeral:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        body, files = await self._read_body(request)
        self._check_message(body, message.flags)
        message.apply(body, files)
        return _json(message.payload(self.bot_user.payload(bot=True), self.base_url))

    async def _cdn(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if key not in self.cdn_files:
            return web.Response(status=404)
        self.cdn_downloads.append(key)
        data, content_type = self.cdn_files[key]
        return web.Response(body=data, content_type=content_type or "application/octet-stream")

    async def _cdn_sent(self, request: web.Request) -> web.Response:
        message = next((m for m in self.messages if str(m.id) == request.match_info["message"]), None)
        index = int(request.match_info["index"])
        if message is None or index >= len(message.files):
            return web.Response(status=404)
        return web.Response(body=message.files[index].data)
