"""A loopback Discord voice server: the voice WebSocket and the UDP media socket, enough for discord.py's
VoiceClient to connect, send audio and leave, with everything it sent recorded for tests.

The DiscordEmulator opens a session here when the bot joins a channel (gateway op 4) and hands the bot
this server's endpoint in VOICE_SERVER_UPDATE. discord.py always dials `wss://ENDPOINT/?v=8`, so the
WebSocket speaks TLS with a certificate made for 127.0.0.1 at start; the bot must trust it
(`client_ssl()`). The voice protocol, as discord.py 2.7.1 speaks it:
- on connect the server says HELLO (op 8); the client IDENTIFYs (op 0: server_id, user_id, session_id,
  token, max_dave_protocol_version); the server answers READY (op 2: ssrc, ip, port, modes);
- the client finds its address by UDP IP discovery (74 bytes: type 1 request, type 2 answer with the
  address, zero-padded, and the port), then SELECT_PROTOCOL (op 1: its address and a mode from READY's);
- the server answers SESSION_DESCRIPTION (op 4: mode, 32-byte secret_key, dave_protocol_version: 0 on a
  stage, 1 in a voice channel whose client offered DAVE); with DAVE the client sends its MLS key package
  as a binary frame (opcode 26); heartbeats are op 3, answered with op 6; SPEAKING is op 5;
- audio comes as RTP over UDP: a 12-byte header (0x80 0x78, sequence, timestamp, ssrc), then the Opus
  frame sealed with aead_xchacha20_poly1305_rtpsize (the header is the associated data; the nonce is a
  4-byte big-endian counter appended to the packet, zero-padded to 24 bytes).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import ssl
import struct
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nacl.secret
from aiohttp import WSMsgType, web

# What Discord offers today (the xsalsa20 modes were removed in November 2024); discord.py 2.7.1 takes the
# first one it supports, and supports only the second.
MODES = ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"]
SPOKEN_MODE = "aead_xchacha20_poly1305_rtpsize"
RTP_HEADER = 12
MLS_KEY_PACKAGE = 26


@dataclass
class RtpPacket:
    at: float  # time.monotonic() on arrival
    sequence: int
    timestamp: int
    opus: bytes  # decrypted


@dataclass
class VoiceSession:
    """One join of one channel, from the gateway's point of view and the voice server's."""

    guild_id: int
    channel_id: int
    user_id: int
    session_id: str
    token: str
    dave: bool  # a voice channel: DAVE is offered (stages are exempt)
    ssrc: int
    secret_key: bytes
    identify: dict | None = None
    selected: dict | None = None  # SELECT_PROTOCOL's data
    dave_protocol_version: int | None = None  # what SESSION_DESCRIPTION said
    speaking: list[tuple[float, int]] = field(default_factory=list)  # (when, SPEAKING flags)
    heartbeats: int = 0
    binary: list[tuple[int, bytes]] = field(default_factory=list)  # (opcode, payload) of binary frames
    packets: list[RtpPacket] = field(default_factory=list)
    undecryptable: int = 0
    closed: bool = False


class _Media(asyncio.DatagramProtocol):
    def __init__(self, server: VoiceServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.server._datagram(data, addr, self.transport)


class VoiceServer:
    def __init__(self) -> None:
        self.sessions: list[VoiceSession] = []
        self._ssrcs = itertools.count(1000)
        self._folder = tempfile.TemporaryDirectory(prefix="voice-tls-")
        self._runner: web.AppRunner | None = None
        self._media: asyncio.DatagramTransport | None = None
        self.endpoint = ""  # host:port of the WebSocket, as VOICE_SERVER_UPDATE carries it
        self.udp_port = 0
        self._on_change = None

    # ----------------------------------------------------------------------------- lifecycle
    async def start(self, on_change: Callable[[], Awaitable[None]] | None = None) -> VoiceServer:
        """Serve on loopback; `on_change` is awaited after everything recorded (DiscordEmulator.wait_for wakes)."""
        self._on_change = on_change
        cert, key = self._make_certificate()
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ssl.load_cert_chain(cert, key)
        app = web.Application()
        app.router.add_get("/", self._voice_ws)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_ssl)
        await site.start()
        self.endpoint = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        self._media, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Media(self), local_addr=("127.0.0.1", 0)
        )
        self.udp_port = self._media.get_extra_info("sockname")[1]
        return self

    async def stop(self) -> None:
        if self._media is not None:
            self._media.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self._folder.cleanup()

    def client_ssl(self) -> ssl.SSLContext:
        """A client context that trusts this server's certificate (and verifies it, hostname included)."""
        return ssl.create_default_context(cafile=str(Path(self._folder.name) / "cert.pem"))

    def _make_certificate(self) -> tuple[str, str]:
        folder = Path(self._folder.name)
        cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        return str(cert), str(key)

    # ----------------------------------------------------------------------------- sessions
    def open_session(self, guild_id: int, channel_id: int, user_id: int, session_id: str, dave: bool) -> VoiceSession:
        """What the gateway does when a user joins a channel: a token for this server."""
        session = VoiceSession(
            guild_id,
            channel_id,
            user_id,
            session_id,
            f"voice-token-{os.urandom(6).hex()}",
            dave,
            next(self._ssrcs),
            os.urandom(32),
        )
        self.sessions.append(session)
        return session

    def _recorded(self) -> None:
        if self._on_change is not None:
            asyncio.get_running_loop().create_task(self._on_change())

    async def _voice_ws(self, request: web.Request) -> web.WebSocketResponse:
        if request.query.get("v") != "8":
            raise web.HTTPBadRequest(text="voice gateway version 8 expected")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session: VoiceSession | None = None
        await ws.send_str(json.dumps({"op": 8, "d": {"heartbeat_interval": 13750.0}}))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY and session is not None:
                    session.binary.append((msg.data[0], bytes(msg.data[1:])))
                elif msg.type == WSMsgType.TEXT:
                    frame = json.loads(msg.data)
                    op, data = frame["op"], frame.get("d")
                    if op == 0:  # IDENTIFY
                        session = next((s for s in self.sessions if s.token == data.get("token")), None)
                        if (
                            session is None
                            or data.get("session_id") != session.session_id
                            or data.get("server_id") != str(session.guild_id)
                            or data.get("user_id") != str(session.user_id)
                        ):
                            await ws.close(code=4004, message=b"Authentication failed.")
                            break
                        session.identify = data
                        await ws.send_str(
                            json.dumps(
                                {
                                    "op": 2,
                                    "d": {
                                        "ssrc": session.ssrc,
                                        "ip": "127.0.0.1",
                                        "port": self.udp_port,
                                        "modes": MODES,
                                    },
                                }
                            )
                        )
                    elif op == 1 and session is not None:  # SELECT_PROTOCOL
                        session.selected = data["data"]
                        if session.selected.get("mode") != SPOKEN_MODE:
                            await ws.close(code=4016, message=b"Unknown encryption mode.")
                            break
                        offered = session.identify.get("max_dave_protocol_version", 0)
                        session.dave_protocol_version = min(offered, 1) if session.dave else 0
                        await ws.send_str(
                            json.dumps(
                                {
                                    "op": 4,
                                    "d": {
                                        "mode": SPOKEN_MODE,
                                        "secret_key": list(session.secret_key),
                                        "dave_protocol_version": session.dave_protocol_version,
                                    },
                                }
                            )
                        )
                    elif op == 3:  # HEARTBEAT
                        if session is not None:
                            session.heartbeats += 1
                        await ws.send_str(json.dumps({"op": 6, "d": {"t": (data or {}).get("t")}}))
                    elif op == 5 and session is not None:  # SPEAKING
                        session.speaking.append((time.monotonic(), data["speaking"]))
                self._recorded()
        finally:
            if session is not None:
                session.closed = True
            self._recorded()
        return ws

    def _datagram(self, data: bytes, addr, transport: asyncio.DatagramTransport) -> None:
        if len(data) == 74 and data[:2] == b"\x00\x01":  # IP discovery: tell the client its address
            ssrc = struct.unpack_from(">I", data, 4)[0]
            answer = struct.pack(">HHI", 2, 70, ssrc) + addr[0].encode().ljust(64, b"\0") + struct.pack(">H", addr[1])
            transport.sendto(answer, addr)
            return
        if len(data) < RTP_HEADER + 4 or data[:2] != b"\x80\x78":
            return
        sequence, timestamp, ssrc = struct.unpack_from(">HII", data, 2)
        session = next((s for s in self.sessions if s.ssrc == ssrc), None)
        if session is None:
            return
        header, sealed, counter = data[:RTP_HEADER], data[RTP_HEADER:-4], data[-4:]
        try:
            opus = nacl.secret.Aead(session.secret_key).decrypt(sealed, header, counter.ljust(24, b"\0"))
        except Exception:
            session.undecryptable += 1
        else:
            session.packets.append(RtpPacket(time.monotonic(), sequence, timestamp, opus))
        self._recorded()
