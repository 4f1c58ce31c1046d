"""discord.py cogs, one per feature: slash commands and result controls. Thin: parse, validate, enqueue,
render; no model code. What several cogs share (delivery, rendering, submission, error replies) is in utils/."""
