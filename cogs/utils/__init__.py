"""Helpers the cogs share (delivery, rendering, submission, error replies); not cogs themselves."""
