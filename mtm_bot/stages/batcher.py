"""Several jobs' work for one model in one batch: MusicGen blocks in one decode loop (`BlockBatcher`),
captioning in one beam search (`CallBatcher`).

A MusicGen step is bound by reading the weights, not by arithmetic, so a step for four blocks costs
little more than a step for one. Every job's thread hands its next block to `BlockBatcher.decode` and
waits; one decode thread takes every block waiting (up to `max_batch`, oldest first) into one
`MusicgenDecoder.decode_blocks` loop, and a block that arrives while the loop runs joins it between two
steps while fewer than `max_batch` decode (the loop moves to a larger batch-size bucket as needed). A job's codes depend
only on its own request (its noise comes from its own generator), never on who shared the loop.

The decode thread is also where the decoder is warmed up (`call`): compiled steps and captured CUDA
graphs stay on the thread that made them.

`CallBatcher` is the same idea for a model that runs whole requests (the captioner's beam search): no
thread of its own; while one batch runs, the calls that arrive wait, and when it ends one of them runs
every waiting call in the next batch.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from ..core.errors import Cancelled
from ..core.progress import CancelToken
from .musicgen_decode import Admit, BlockRequest, Done

T = TypeVar("T")
In = TypeVar("In")
Out = TypeVar("Out")
# MusicgenDecoder.decode_blocks(blocks, max_blocks, admit)
DecodeBlocks = Callable[[Sequence[tuple[BlockRequest, Done]], int, Admit | None], None]

POLL_SECONDS = 0.05  # how often a call waiting for its batch looks at its cancel token


@dataclass(eq=False)  # compared by identity: a request holds tensors
class _Waiting:
    request: BlockRequest | None  # None: a call to run on the decode thread
    result: Future = field(default_factory=Future)
    call: Callable[[], object] | None = None
    state: torch.Tensor | None = None  # its generator's state when its loop took it

    @property
    def block(self) -> BlockRequest:
        assert self.request is not None, "a call, not a block"
        return self.request


class _Inbox:
    """What the decode thread waits on. The thread holds this and only a weak reference to its batcher,
    so a batcher nobody uses any more (and the model its decode function holds) can be freed; then the
    thread ends."""

    def __init__(self) -> None:
        self.waiting: deque[_Waiting] = deque()
        self.changed = threading.Condition()
        self.closed = False

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()


class BlockBatcher:
    def __init__(self, decode: DecodeBlocks, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.decode_blocks = decode
        self.max_batch = max_batch
        self._inbox = _Inbox()
        self._waiting = self._inbox.waiting
        self._changed = self._inbox.changed
        self.batch_sizes: list[int] = []  # blocks each decode loop started with, for tests and benchmarks
        self.joined = 0  # blocks that joined a loop already running
        self._thread = threading.Thread(
            target=_serve, args=(self._inbox, weakref.ref(self)), name="mtm-decode", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._inbox.close)

    def decode(self, request: BlockRequest, cancel: CancelToken | None = None) -> torch.Tensor:
        """The codes of one block, decoded with whatever other blocks are waiting or decoding (it joins a
        running loop between two steps when a slot is free); raises what its on_step raised (a cancel)
        or what decoding raised. A block whose job is cancelled while it waits for a slot leaves at once."""
        waiting = self._submit(_Waiting(request))
        while True:
            try:
                return waiting.result.result(timeout=POLL_SECONDS)
            except FutureTimeout:
                if cancel is None or not cancel.cancelled:
                    continue
            with self._changed:
                if waiting in self._waiting:  # not yet in a loop; once in one, its on_step stops it
                    self._waiting.remove(waiting)
                    raise Cancelled("The job was cancelled.")

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the decode thread (warm-up, compile, capture) and return its result."""
        return self._submit(_Waiting(None, call=fn)).result.result()

    def _submit(self, waiting: _Waiting) -> _Waiting:
        with self._changed:
            self._waiting.append(waiting)
            self._changed.notify()
        return waiting

    def _serve_one(self) -> None:
        """Run what waits first: a call, or a decode loop for up to max_batch waiting blocks."""
        with self._changed:
            if not self._waiting:  # the block the thread woke for left (its job was cancelled) before it got here
                return
            if self._waiting[0].request is None:
                call, first = self._waiting.popleft(), []
            else:
                call, first = None, self._take(self.max_batch)
        if call is not None and call.call is not None:
            _settle(call.result, call.call)
        else:
            self._decode(first, admit=self.max_batch > 1)

    def _take(self, most: int) -> list[_Waiting]:
        """Up to `most` waiting blocks, oldest first, stopping at a call (it runs between loops); each
        remembers its generator's state in case its loop runs out of memory. Hold `_changed`."""
        taken: list[_Waiting] = []
        while self._waiting and self._waiting[0].request is not None and len(taken) < most:
            waiting = self._waiting.popleft()
            waiting.state = _state_of(waiting.block.generator)
            taken.append(waiting)
        return taken

    def _decode(self, first: list[_Waiting], admit: bool) -> None:
        """One decode loop for `first` and (with `admit`) every block that arrives while it runs, up to
        max_batch at once. Out of memory, the blocks not yet done run again in halves, without newcomers,
        from the same noise (each generator's state is restored), so no job fails for sharing a loop."""
        in_loop = list(first)

        def done(waiting: _Waiting) -> Done:
            def finish(result: torch.Tensor | Exception) -> None:
                in_loop.remove(waiting)
                if isinstance(result, BaseException):
                    waiting.result.set_exception(result)
                else:
                    waiting.result.set_result(result)

            return finish

        def newcomers(room: int) -> list[tuple[BlockRequest, Done]]:
            with self._changed:
                joining = self._take(room)
            in_loop.extend(joining)
            self.joined += len(joining)
            return [(w.block, done(w)) for w in joining]

        try:
            most = self.max_batch if admit else len(first)
            self.decode_blocks([(w.block, done(w)) for w in first], most, newcomers if admit else None)
            self.batch_sizes.append(len(first))
        except torch.OutOfMemoryError as error:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            left = list(in_loop)
            if len(left) == 1:
                left[0].result.set_exception(error)
                return
            for waiting in left:
                _restore(waiting.block.generator, waiting.state)
            half = len(left) // 2
            self._decode(left[:half], admit=False)
            self._decode(left[half:], admit=False)
        except BaseException as error:  # a bug: every job of the loop hears of it
            for waiting in in_loop:
                waiting.result.set_exception(error)


def _serve(inbox: _Inbox, batcher: weakref.ref[BlockBatcher]) -> None:
    """The decode thread: serve the batcher while it lives."""
    while True:
        with inbox.changed:
            while not inbox.waiting and not inbox.closed:
                inbox.changed.wait()
            if inbox.closed:
                return
        serving = batcher()
        if serving is None:
            return
        serving._serve_one()
        del serving  # hold no reference while waiting


@dataclass(eq=False)
class _Call(Generic[In]):
    item: In
    cancel: CancelToken | None
    result: Future = field(default_factory=Future)


class CallBatcher(Generic[In, Out]):
    """Calls from several job threads to one model, run together: `run(items, cancels)` returns one result
    per item. Up to `max_batch` waiting calls, oldest first, go into each batch; a batch that fails (out of
    memory, one bad item) runs again one call at a time, so a call fails only for its own reasons. A call
    whose job is cancelled while it waits leaves at once; `run` gets the cancel tokens of its batch."""

    def __init__(self, run: Callable[[list[In], list[CancelToken | None]], list[Out]], max_batch: int) -> None:
        self.run = run
        self.max_batch = max_batch
        self._waiting: deque[_Call] = deque()
        self._busy = False
        self._changed = threading.Condition()
        self.batch_sizes: list[int] = []  # calls per batch, for tests and benchmarks

    def __call__(self, item: In, cancel: CancelToken | None = None) -> Out:
        call = _Call(item, cancel)
        with self._changed:
            self._waiting.append(call)
        while not call.result.done():
            with self._changed:
                if self._busy or not self._waiting:
                    self._changed.wait(POLL_SECONDS)
                    if cancel is not None and cancel.cancelled and call in self._waiting:
                        self._waiting.remove(call)
                        raise Cancelled("The job was cancelled.")
                    continue
                self._busy = True
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            try:
                self._run(batch)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
        return call.result.result()

    def _run(self, batch: list[_Call]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            results = self.run([c.item for c in batch], [c.cancel for c in batch])
        except Exception as error:
            if len(batch) == 1 or isinstance(error, Cancelled):  # Cancelled: every job of the batch was
                for c in batch:
                    c.result.set_exception(error)
                return
            if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            for c in batch:
                self._run([c])
            return
        for c, result in zip(batch, results):
            c.result.set_result(result)


def _settle(result: Future, fn: Callable[[], object]) -> None:
    try:
        result.set_result(fn())
    except BaseException as error:
        result.set_exception(error)


def _state_of(generator: torch.Generator | None) -> torch.Tensor | None:
    return None if generator is None else generator.get_state()


def _restore(generator: torch.Generator | None, state: torch.Tensor | None) -> None:
    if generator is not None and state is not None:
        generator.set_state(state)
