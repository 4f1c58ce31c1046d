"""The plain core: settings, errors users read, audio I/O, progress and cancellation, seeds, retries,
metrics. Imports nothing else of mtm_bot."""
