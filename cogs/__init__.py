"""discord.py cogs: slash commands and rendering. Thin: parse, validate, enqueue, render; no model code."""
