"""MTM (Music -> Text -> Music): caption a clip, refine the captions with an LLM, generate with MusicGen.

This package never imports discord.py: the bot, the CLI, tests and workers share it.
"""
