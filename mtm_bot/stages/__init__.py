"""The model stages and their decode loops (captioner, refiner, MusicGen generator, image captioner,
transcriber) and the pipeline that chains them; what a finished track keeps. Imports only mtm_bot.core."""
