"""Test setup: never touch the network, keep the two CI cores for the tests themselves."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MTM_PROFILE", "tiny")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and spinning threads fight the bot subprocesses the
# end-to-end tests start (inherited through the environment) for the two CI cores.
os.environ["OMP_NUM_THREADS"] = "1"

import torch

torch.set_num_threads(1)
