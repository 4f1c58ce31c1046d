"""Test setup: never touch the network, keep the two CI cores for the tests themselves."""

import faulthandler
import os
import sys
import threading

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MTM_PROFILE", "tiny")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and spinning threads fight the bot subprocesses the
# end-to-end tests start (inherited through the environment) for the two CI cores.
os.environ["OMP_NUM_THREADS"] = "1"

import torch

torch.set_num_threads(1)

EXIT_GRACE_SECONDS = 60
_exit_status = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_exit_status] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A test that dies by pytest-timeout abandons its event loop, and with it, for example, an aiosqlite
    connection whose thread is not a daemon: the process would never exit and CI would wait out its whole
    limit. If the process is still here a minute after the summary, say which threads hold it, and leave."""
    status = config.stash.get(_exit_status, 1)

    def leave_if_still_here() -> None:
        held_by = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        print(
            f"\nThe test process did not exit {EXIT_GRACE_SECONDS} s after the tests ended: threads "
            f"{held_by} still run (a test left them). Their stacks follow; exiting now.",
            file=sys.stderr,
        )
        faulthandler.dump_traceback(file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(status or 1)

    watchdog = threading.Timer(EXIT_GRACE_SECONDS, leave_if_still_here)
    watchdog.daemon = True
    watchdog.start()
