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
  are refused with 400 Invalid Form Body, and recorded in `refused`.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import WSMsgType, web

EPHEMERAL = 1 << 6
LOADING = 1 << 7
MANAGE_GUILD = 1 << 5
MEMBER_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 15) | (1 << 31)  # view, send, attach files, use commands

# Interaction callback types.
CHANNEL_MESSAGE = 4
DEFERRED_CHANNEL_MESSAGE = 5

# Option types of slash commands.
OPTION_STRING, OPTION_INTEGER, OPTION_ATTACHMENT = 3, 4, 11

_snowflakes = itertools.count(1_300_000_000_000_000_000)


def snowflake() -> int:
    return next(_snowflakes)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py parses a body as JSON only when the Content-Type is exactly this.
    return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


@dataclass
class FakeUser:
    id: int
    name: str
    manage_guild: bool = False

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def payload(self, bot: bool = False) -> dict:
        return {"id": str(self.id), "username": self.name, "global_name": self.name, "discriminator": "0",
                "avatar": None, "bot": bot, "public_flags": 0}


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
    via: str  # "response" (interaction reply / thinking), "followup" or "channel"
    content: str = ""
    embeds: list[dict] = field(default_factory=list)
    allowed_mentions: dict | None = None
    flags: int = 0
    files: list[SentFile] = field(default_factory=list)
    interaction_id: int | None = None
    deleted: bool = False
    history: list[dict] = field(default_factory=list)  # every state the message had, oldest first
    created_at: float = field(default_factory=time.monotonic)

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
        self.history.append({"content": self.content, "embeds": self.embeds, "flags": self.flags,
                             "allowed_mentions": self.allowed_mentions, "files": [f.filename for f in self.files],
                             "at": time.monotonic()})

    def payload(self, author: dict, base_url: str) -> dict:
        return {
            "id": str(self.id), "channel_id": str(self.channel_id), "author": author, "type": 0,
            "content": self.content, "embeds": self.embeds, "flags": self.flags, "timestamp": _now_iso(),
            "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
            "mention_roles": [], "pinned": False, "components": [],
            "attachments": [
                {"id": str(i), "filename": f.filename, "size": len(f.data), "content_type": f.content_type,
                 "url": f"{base_url}/cdn/sent/{self.id}/{i}", "proxy_url": f"{base_url}/cdn/sent/{self.id}/{i}"}
                for i, f in enumerate(self.files)
            ],
        }


@dataclass
class Interaction:
    id: int
    token: str
    user: FakeUser
    channel_id: int
    command: str
    dispatched_at: float
    attachment_size_limit: int
    callback_type: int | None = None
    callback_at: float | None = None
    response: Message | None = None  # the original response (or the deferred "thinking" message)
    followups: list[Message] = field(default_factory=list)
    callback_errors: list[str] = field(default_factory=list)

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
        self.refused: list[str] = []  # messages refused for breaking Discord's size limits
        self.identifies = 0
        self.resumes = 0
        self.expired_tokens: dict[str, int] = {}  # token -> the status its webhook calls get
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # ----------------------------------------------------------------------------- lifecycle
    async def start(self, port: int = 0) -> "DiscordEmulator":
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
        r.add_get("/cdn/attachments/{key}/{filename}", self._cdn)
        r.add_get("/cdn/sent/{message}/{index}", self._cdn_sent)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://{self.base_url.removeprefix('http://')}/gateway"

    def env(self, token: str = "emulator-token") -> dict[str, str]:
        """The environment variables that point a bot at this emulator."""
        return {"DISCORD_TOKEN": token, "DISCORD_API_BASE": self.api_base,
                "DISCORD_GATEWAY_URL": self.gateway_url, "MTM_GUILD_ID": str(self.guild_id)}

    # ----------------------------------------------------------------------------- test API
    def user(self, name: str, manage_guild: bool = False) -> FakeUser:
        return FakeUser(snowflake(), name, manage_guild)

    def expire_tokens(self, *interactions: Interaction, status: int = 404) -> None:
        """From now on webhook calls with these interactions' tokens (all, if none given) fail like an
        expired token: 401 Invalid Webhook Token or 404 Unknown Webhook."""
        for interaction in interactions or self.interactions.values():
            self.expired_tokens[interaction.token] = status

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

    async def slash(self, user: FakeUser, command: str, options: dict[str, Any] | None = None,
                    attachment: tuple[bytes, str, str | None] | None = None, declared_size: int | None = None,
                    attachment_size_limit: int | None = None,
                    attachments: dict[str, tuple] | None = None, guild_id: int | None = None) -> Interaction:
        """Dispatch a slash command as if `user` ran it; `attachment` = (bytes, filename, content_type)
        becomes the `audio` option, served from this emulator's CDN (with `declared_size` if given).
        `attachments` adds attachment options by name: (bytes, filename, content_type[, declared_size]).
        `guild_id` sends it from another server than the emulated guild (the bot then knows that guild
        only from the interaction, and its commands must have been synced globally)."""
        if not self._sockets:
            raise AssertionError("the bot is not connected to the gateway")
        options = dict(options or {})
        files = dict(attachments or {})
        if attachment is not None:
            files["audio"] = (*attachment, declared_size)
        resolved: dict = {"attachments": {}} if files else {}
        for option, (data, filename, content_type, *size) in files.items():
            attachment_id = snowflake()
            key = str(attachment_id)
            self.cdn_files[key] = (data, content_type)
            url = f"{self.base_url}/cdn/attachments/{key}/{filename}"
            declared = size[0] if size and size[0] is not None else len(data)
            meta = {"id": key, "filename": filename, "size": declared, "url": url, "proxy_url": url}
            if content_type is not None:
                meta["content_type"] = content_type
            resolved["attachments"][key] = meta
            options[option] = attachment_id
        option_list = []
        for name, value in options.items():
            kind = OPTION_ATTACHMENT if name in files else OPTION_INTEGER if isinstance(value, int) else OPTION_STRING
            option_list.append({"name": name, "type": kind, "value": str(value) if kind == OPTION_ATTACHMENT else value})
        registered = {c["name"]: c for c in self.commands.get(str(self.guild_id), []) + self.commands.get("global", [])}
        if command not in registered:
            raise AssertionError(f"/{command} was never synced; synced: {sorted(registered)}")
        limit = self.attachment_size_limit if attachment_size_limit is None else attachment_size_limit
        interaction = Interaction(snowflake(), f"itoken-{snowflake()}", user, self.channel_id, command,
                                  time.monotonic(), limit)
        self.interactions[interaction.id] = interaction
        permissions = MEMBER_PERMISSIONS | (MANAGE_GUILD if user.manage_guild else 0)
        guild = str(self.guild_id if guild_id is None else guild_id)
        payload = {
            "id": str(interaction.id), "application_id": str(self.application_id), "type": 2,
            "token": interaction.token, "version": 1, "guild_id": guild,
            "channel_id": str(self.channel_id), "channel": {**self._channel_payload(), "guild_id": guild},
            "member": {"user": user.payload(), "roles": [], "joined_at": _now_iso(), "deaf": False, "mute": False,
                       "flags": 0, "permissions": str(permissions)},
            "data": {"id": registered[command]["id"], "name": command, "type": 1, "options": option_list,
                     "resolved": resolved, "guild_id": guild},
            "app_permissions": str(MEMBER_PERMISSIONS), "locale": "en-US", "guild_locale": "en-US",
            "entitlements": [], "authorizing_integration_owners": {"0": guild}, "context": 0,
            "attachment_size_limit": limit,
        }
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    async def dispatch(self, event: str, data: dict) -> None:
        for ws in list(self._sockets):
            await ws.send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data}))

    async def reconnect(self) -> None:
        """Ask the bot to reconnect (op 7); discord.py then RESUMEs its session."""
        for ws in list(self._sockets):
            await ws.send_str(json.dumps({"op": 7, "d": None}))

    # ----------------------------------------------------------------------------- internals
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
        return {"id": str(self.channel_id), "type": 0, "name": "music", "position": 0, "guild_id": str(self.guild_id),
                "permission_overwrites": [], "nsfw": False, "parent_id": None}

    def _guild_payload(self) -> dict:
        return {
            "id": str(self.guild_id), "name": "Emulated Guild", "icon": None, "owner_id": str(snowflake()),
            "roles": [{"id": str(self.guild_id), "name": "@everyone", "permissions": str(MEMBER_PERMISSIONS),
                       "position": 0, "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "channels": [self._channel_payload()], "threads": [], "emojis": [], "stickers": [], "features": [],
            "members": [{"user": self.bot_user.payload(bot=True), "roles": [], "joined_at": _now_iso(),
                         "deaf": False, "mute": False, "flags": 0}],
            "member_count": 2, "voice_states": [], "presences": [], "large": False, "unavailable": False,
            "joined_at": _now_iso(), "premium_tier": 0, "preferred_locale": "en-US", "verification_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0, "mfa_level": 0, "nsfw_level": 0,
            "system_channel_flags": 0, "afk_timeout": 300,
        }

    def _authorised(self, request: web.Request) -> bool:
        return self.token is not None and request.headers.get("Authorization") == f"Bot {self.token}"

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url, "shards": 1,
                      "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}})

    async def _get_me(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bot ") or len(auth) <= 4 or (
                self.valid_token is not None and auth != f"Bot {self.valid_token}"):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        self.token = auth.removeprefix("Bot ")
        return _json(self.bot_user.payload(bot=True))

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json({"id": str(self.application_id), "name": "MTM Bot", "description": "", "icon": None,
                      "bot_public": False, "bot_require_code_grant": False, "verify_key": "0" * 64, "flags": 0,
                      "owner": FakeUser(snowflake(), "owner").payload(), "team": None, "summary": ""})

    async def _commands(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        scope = request.match_info.get("guild", "global")
        if request.method == "PUT":
            commands = []
            for command in await request.json():
                commands.append({**command, "id": str(snowflake()), "application_id": str(self.application_id),
                                 "version": str(snowflake()), "type": command.get("type", 1)})
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
        ready = {
            "v": 10, "user": self.bot_user.payload(bot=True), "session_id": f"session-{snowflake()}",
            "resume_gateway_url": self.gateway_url, "guilds": [{"id": str(self.guild_id), "unavailable": True}],
            "application": {"id": str(self.application_id), "flags": 0}, "private_channels": [],
            "relationships": [], "shard": [0, 1],
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
            texts = [embed.get("title", ""), embed.get("description", ""), embed.get("footer", {}).get("text", ""),
                     *(f.get("name", "") for f in fields), *(f.get("value", "") for f in fields)]
            total += sum(len(t) for t in texts)
            if (len(embed.get("title", "")) > 256 or len(embed.get("description", "")) > 4096 or len(fields) > 25
                    or any(len(f.get("name", "")) > 256 or len(f.get("value", "")) > 1024 for f in fields)):
                return "embeds: an embed is over its size limits."
        return "embeds: Embed size exceeds maximum size of 6000" if total > 6000 else None

    def _refuse_if_too_big(self, body: dict) -> None:
        reason = self._too_big(body)
        if reason is not None:
            self.refused.append(reason)
            raise web.HTTPBadRequest(body=json.dumps({"message": "Invalid Form Body", "code": 50035,
                                                      "errors": reason}).encode(),
                                     headers={"Content-Type": "application/json"})

    def _new_message(self, via: str, body: dict, files: list[SentFile], interaction: Interaction | None) -> Message:
        message = Message(snowflake(), self.channel_id if interaction is None else interaction.channel_id, via,
                          flags=int(body.get("flags", 0)) & EPHEMERAL,
                          interaction_id=None if interaction is None else interaction.id)
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
        self._refuse_if_too_big(data)
        interaction.callback_type, interaction.callback_at = kind, now
        message = self._new_message("response", data, files, interaction)
        if kind == DEFERRED_CHANNEL_MESSAGE:
            message.flags |= LOADING
        interaction.response = message
        author = self.bot_user.payload(bot=True)
        return _json({"interaction": {"id": str(interaction.id), "type": 2, "response_message_id": str(message.id),
                                      "response_message_loading": message.thinking,
                                      "response_message_ephemeral": message.ephemeral},
                      "resource": {"type": kind, "message": message.payload(author, self.base_url)}})

    async def _followup(self, request: web.Request) -> web.Response:
        interaction, refusal = self._webhook_refusal(request)
        if refusal is not None:
            return refusal
        body, files = await self._read_body(request)
        self._refuse_if_too_big(body)
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
        message = interaction.response if key == "@original" else next(
            (m for m in candidates if str(m.id) == key), None)
        if message is None or message.deleted:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        if request.method == "DELETE":
            message.deleted = True
            return web.Response(status=204)
        if request.method == "PATCH":
            body, files = await self._read_body(request)
            self._refuse_if_too_big(body)
            message.flags &= ~LOADING
            message.apply(body, files)
        return _json(message.payload(self.bot_user.payload(bot=True), self.base_url))

    async def _channel_message(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        if request.match_info["channel"] != str(self.channel_id):
            return _json({"message": "Unknown Channel", "code": 10003}, 404)
        body, files = await self._read_body(request)
        self._refuse_if_too_big(body)
        message = self._new_message("channel", body, files, None)
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
