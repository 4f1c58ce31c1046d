"""Message text for jobs: status lines, caption sets within Discord's size limits, durations, library replies.

Discord refuses content over 2 000 characters, embed fields over 1 024 and embeds over 6 000 in
total per message; a long caption set moves into embed fields and is shortened with an ellipsis
where it must be, so a message is never refused.
"""

from __future__ import annotations

import discord

from mtm_bot.jobs.library import Match

CONTENT_LIMIT = 2000
FIELD_LIMIT = 1024
FIELD_NAME_LIMIT = 256
EMBED_TOTAL_LIMIT = 6000
FIELDS_PER_EMBED = 25
ELLIPSIS = "…"
COLOUR = discord.Colour.from_rgb(88, 101, 242)


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + ELLIPSIS


def quote(text: str) -> str:
    """User text shown inline; mentions stay inert because every message disables pings."""
    return "“" + discord.utils.escape_markdown(text.replace("\n", " ")) + "”"


def minutes(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


def with_captions(header: str, lines: list[str], title: str = "Captions") -> tuple[str, list[discord.Embed]]:
    """`header` plus one caption line each: as plain content when it fits, else in an embed."""
    plain = "\n".join([header, *lines])
    if len(plain) <= CONTENT_LIMIT:
        return plain, []
    return shorten(header, CONTENT_LIMIT), [captions_embed(lines, title)]


def captions_embed(lines: list[str], title: str) -> discord.Embed:
    """Consecutive caption lines grouped into fields of at most 1 024 characters, 6 000 in all."""
    embed = discord.Embed(title=title, colour=COLOUR)
    budget = EMBED_TOTAL_LIMIT - len(title)
    chunks: list[list[str]] = []
    for line in lines:
        line = shorten(line, FIELD_LIMIT)
        if chunks and len("\n".join([*chunks[-1], line])) <= FIELD_LIMIT:
            chunks[-1].append(line)
        else:
            chunks.append([line])
    for i, chunk in enumerate(chunks):
        name = shorten(_span(chunk), FIELD_NAME_LIMIT)
        value = "\n".join(chunk)
        last_slot = len(embed.fields) == FIELDS_PER_EMBED - 1 and i < len(chunks) - 1
        if last_slot:
            value += "\n" + ELLIPSIS
        room = min(FIELD_LIMIT, budget - len(name))
        if len(value) > room:  # out of space: show what fits, ending in an ellipsis
            if room > len(ELLIPSIS):
                embed.add_field(name=name, value=shorten(value, room), inline=False)
            break
        embed.add_field(name=name, value=value, inline=False)
        budget -= len(name) + len(value)
        if last_slot:
            break
    return embed


def _span(chunk: list[str]) -> str:
    """`0:00–0:30` from the first line's start to the last line's end ("M:SS–M:SS caption" lines)."""
    first, last = chunk[0].split(" ", 1)[0], chunk[-1].split(" ", 1)[0]
    if "–" in first and "–" in last:
        return f"{first.split('–')[0]}–{last.split('–')[1]}"
    return "Captions"


# /library: what a search answers, from the words typed (cogs.library) or a described picture (delivery)
RESULTS_SHOWN = 5
EMPTY_LIBRARY = (
    "This server's library is empty so far: every track that /compose delivers here is added to it, "
    "and then `/library` finds it again."
)


def jump_url(match: Match) -> str:
    return f"https://discord.com/channels/{match.guild_id}/{match.channel_id}/{match.message_id}"


def library_reply(searched: str, matches: list[Match]) -> str:
    """`searched`: what the search was made with, as a phrase ("“festive brass”")."""
    if not matches:
        return EMPTY_LIBRARY
    lines = [f"📚 This server's closest tracks to {searched}:"]
    for rank, match in enumerate(matches, 1):
        lines.append(
            f"{rank}. {quote(match.title)} · similarity {match.similarity:.2f} · by <@{match.user_id}> · "
            f"<t:{int(match.created_at)}:d> · [result]({jump_url(match)})"
        )
    return shorten("\n".join(lines), CONTENT_LIMIT)
