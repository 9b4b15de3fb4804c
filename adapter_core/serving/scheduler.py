"""One inference thread for all users: replies decoded together, compression in slices between.

The thread owns the engine. Each turn of its loop

1. lets the replies that arrived join the running batch (one prefill for all of them); a reply
   whose prompt is longer than `long_prompt_tokens` is prefilled apart, in slices (4.),
2. decodes one token for every reply in the batch and hands each its new tokens, dropping the
   rows that ended or whose reader cancelled, and
3. every `steps_per_slice` decode steps (or at once when no reply is running) carries on with
   the oldest long prefill, or when there is none the oldest compression, for about
   `slice_seconds`.

4. A long prefill runs in a greenlet too, chunk by chunk (DecodeBatch.prefill), and steps aside
   before a decoder layer once its slice is used up and other replies wait: a user who sends an
   8K-token prompt waits for it, everyone else only for one layer of one chunk. Long prefills go
   one at a time and before compressions, and a compression paused meanwhile resumes only once
   the prefill has ended (so the two greenlets' grad-mode contexts nest).

A compression is one ordinary `engine.absorb` (passes of `windows_per_pass` windows, as the app
always absorbed) run in a greenlet, which steps aside at a decoder layer's boundary once its
slice is used up and a reply is waiting, and carries on later from that very point: the pass is
unchanged, so the adapter is the same bit for bit, and a reply waits for at most one layer of
a compression (tens of milliseconds on a CPU), not for all of it. Replies of different users
share every decode step (continuous batching, one adapter per row); a failed or cancelled reply
leaves without harming the others. The order of one user's turns is the caller's to keep (the
app allows one running turn per user).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from greenlet import GreenletExit, greenlet

from ..memory.compressor import Compressor, GeneratorCompressor, Progress
from .decoding import PREFILL_CHUNK_TOKENS, DecodeBatch, Prefilled, Reply, ReplyRequest, Row, finished_reply
from ..memory.model import GenerativeAdapterModel, Texts
from ..memory.state import AdapterState

log = logging.getLogger(__name__)

_END = object()  # the last item of a stream's queue


class LoopStopped(RuntimeError):
    """The inference loop is not running (stopped, or never started)."""


class ReplyStream:
    """A reply being decoded: iterate for its text as it grows; result() once it has ended.

    Iterating yields pieces of text (decoded here, in the reader's thread, not the loop's);
    cancel() ends the reply at the next decode step, e.g. when its reader went away.
    """

    def __init__(self, request: ReplyRequest, tokenizer):
        self.request = request
        self.tokenizer = tokenizer
        self.submitted = time.perf_counter()
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._result: Future[Reply] = Future()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> Reply:
        """The finished reply (waits for it)."""
        return self._result.result(timeout)

    def result_ready(self) -> bool:
        """Whether the reply has ended."""
        return self._result.done()

    def token_ids(self) -> Iterator[int]:
        """The reply's token ids as they are chosen (read either these or the text, not both)."""
        while (token := self._tokens.get()) is not _END:
            yield token

    def __iter__(self) -> Iterator[str]:
        tokens: list[int] = []
        shown = ""
        for token in self.token_ids():
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a character cut between tokens: wait for its rest
                continue
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
            shown = text
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.startswith(shown) and len(text) > len(shown):  # what was held back at the very end
            yield text[len(shown):]

    # --- called by the loop ----------------------------------------------------------------------

    def _push(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self._tokens.put(token)

    def _end(self, reply: Reply) -> None:
        self._tokens.put(_END)
        self._result.set_result(reply)


@dataclass
class _Compression:
    """One absorb request, run in its own greenlet so that it can step aside between layers."""

    state: AdapterState
    texts: Texts
    future: Future
    compressor: Compressor
    replay: Sequence[str] = ()
    progress: Progress | None = None
    runner: greenlet | None = None


@dataclass
class _LongPrefill:
    """A reply whose long prompt is prefilled in a greenlet of its own, in slices (see the module docstring)."""

    stream: ReplyStream
    runner: greenlet | None = None


class InferenceLoop:
    """The thread that runs every reply and compression of the app on one engine."""

    def __init__(self, engine: GenerativeAdapterModel, *, max_rows: int = 32, windows_per_pass: int = 4,
                 slice_seconds: float = 0.25, steps_per_slice: int = 4, long_prompt_tokens: int = PREFILL_CHUNK_TOKENS):
        """max_rows: most replies decoded at once (others wait to join); windows_per_pass: windows
        of one user's text in one absorbing pass (4, as the app before this loop, so adapters are
        unchanged); slice_seconds: how long a compression runs before it lets waiting replies in;
        steps_per_slice: decode steps between two slices of a compression or long prefill while
        replies run; long_prompt_tokens: longer prompts are prefilled in slices, apart."""
        if (max_rows < 1 or windows_per_pass < 1 or steps_per_slice < 1 or long_prompt_tokens < 1
                or not slice_seconds > 0):
            raise ValueError("max_rows, windows_per_pass, steps_per_slice, long_prompt_tokens must be >= 1 "
                             "and slice_seconds > 0")
        self.engine = engine
        self.max_rows, self.windows_per_pass = max_rows, windows_per_pass
        self.slice_seconds, self.steps_per_slice = slice_seconds, steps_per_slice
        self.long_prompt_tokens = long_prompt_tokens
        self.generator = GeneratorCompressor(engine, windows_per_pass)
        """What absorb uses when it is given no compressor: the generator's pass."""
        self._inbox: deque[ReplyStream] = deque()
        self._compressions: deque[_Compression] = deque()
        self._long_prefills: deque[_LongPrefill] = deque()  # owned by the loop's thread
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        # owned by the loop's thread
        self._batch = DecodeBatch(engine)
        self._streams: dict[int, ReplyStream] = {}  # id(row) -> its stream
        self._slice_ends = 0.0

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self, own_thread: bool = True) -> InferenceLoop:
        """Accept work from now on; with own_thread, a new thread runs the loop, else the caller
        must call run() (the app runs it on the process's main thread: see run)."""
        with self._wake:
            if self._running:
                return self
            self._running = True
        if own_thread:
            self._thread = threading.Thread(target=self.run, name="inference", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """The loop itself, in the calling thread, until stop() (from another thread) or an interrupt.

        On the main thread of the process a decode step of 16 replies measured 55 ms on a 2-core
        CPU, on any other thread 90 ms (torch's OpenMP thread team does worse there), so the app
        runs the loop on its main thread and everything else around it.
        """
        self._run()

    @property
    def running(self) -> bool:
        """Whether it takes work (started and not stopped)."""
        return self._running

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop after the current step; replies running or waiting end as stopped, compressions fail.
        (When run() runs in another thread than the loop's own, the caller waits for it to return.)"""
        with self._wake:
            self._running = False
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> InferenceLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what callers ask for ------------------------------------------------------------------------

    def submit(self, request: ReplyRequest) -> ReplyStream:
        """Start a reply; it joins the running batch at the next decode step."""
        stream = ReplyStream(request, self.engine.tokenizer)
        with self._wake:
            if not self._running:
                raise LoopStopped("the inference loop is not running")
            self._inbox.append(stream)
            self._wake.notify()
        return stream

    def reply(self, requests: Sequence[ReplyRequest]) -> list[Reply]:
        """Several replies, decoded alongside everyone else's; waits for all of them."""
        streams = [self.submit(r) for r in requests]
        return [s.result() for s in streams]

    def absorb(self, state: AdapterState, texts: Texts, compressor: Compressor | None = None,
               replay: Sequence[str] = (), progress: Progress | None = None) -> AdapterState:
        """A new state that also holds `texts`: `compressor.absorb(state, texts, replay)` (no
        compressor: the generator's, `engine.absorb(state, texts, windows_per_pass)`), bit for bit,
        run in slices between decode steps; waits for it. progress: told (steps done, steps in
        all) as it goes, in the loop's thread (so it must be quick)."""
        job = _Compression(state, texts, Future(), compressor or self.generator, replay, progress)
        with self._wake:
            if not self._running:
                raise LoopStopped("the inference loop is not running")
            self._compressions.append(job)
            self._wake.notify()
        return job.future.result()

    # --- the loop --------------------------------------------------------------------------------------

    def _run(self) -> None:
        steps = 0
        try:
            while True:
                with self._wake:
                    while self._running and not (self._inbox or self._compressions or self._batch.rows
                                                 or self._long_prefills):
                        self._wake.wait()
                    if not self._running:
                        break
                    newcomers = self._take_newcomers()
                try:
                    short = []
                    for stream in newcomers:
                        if len(stream.request.prompt) <= self.long_prompt_tokens:
                            short.append(stream)
                        else:
                            self._long_prefills.append(_LongPrefill(stream))
                    if short:
                        self._join(short)
                        self._hand_out()
                    if self._batch.rows:
                        self._step()
                        steps += 1
                        self._hand_out()
                    if not self._batch.rows or steps >= self.steps_per_slice:
                        if self._long_prefills:
                            self._prefill_slice()
                            steps = 0
                        elif self._compressions:
                            self._slice()
                            steps = 0
                except Exception:  # a bug of the loop itself: the replies in flight fail, the loop goes on
                    log.exception("the inference loop failed; its running replies end as failed")
                    self._fail_batch()
        finally:
            with self._wake:
                self._running = False
            self._shut()

    def _take_newcomers(self) -> list[ReplyStream]:
        """The waiting replies that fit in the batch (called holding the lock); cancelled ones end here."""
        waiting = [s for s in self._inbox if not self._ended_early(s)]
        room = max(0, self.max_rows - len(self._batch) - len(self._long_prefills))
        self._inbox = deque(waiting[room:])
        return waiting[:room]

    def _join(self, newcomers: list[ReplyStream]) -> None:
        try:
            prefilled = self._batch.prefill([s.request for s in newcomers])
        except Exception:
            if len(newcomers) == 1:
                log.exception("a reply failed to start")
                self._end_unstarted(newcomers[0], "failed")
                return
            for stream in newcomers:  # find the one that fails; the others still start
                self._join([stream])
            return
        self._add(prefilled, newcomers)

    def _step(self) -> None:
        try:
            self._batch.step()
        except Exception:  # the forward pass failed: every row of it fails, the loop goes on
            log.exception("a decode step of %d replies failed", len(self._batch))
            for row in self._batch.rows:
                row.finish = row.finish or "failed"

    def _hand_out(self) -> None:
        """Give each stream its new tokens; end the rows that finished or were cancelled."""
        ended: list[Row] = []
        for row in self._batch.rows:
            stream = self._streams[id(row)]
            stream._push(row.news())
            if stream.cancelled and not row.finish:
                row.finish = "cancelled"
            if row.finish:
                ended.append(row)
        for row in ended:
            stream = self._streams.pop(id(row))
            stream._end(finished_reply(row, self.engine.tokenizer, stream.submitted))
        self._batch.leave(ended)

    def _prefill_slice(self) -> None:
        """Carry on with the oldest long prefill until its slice is used up and a reply waits, or it
        ends (its reply then joins the batch); a cancelled one stops here."""
        job = self._long_prefills[0]
        if job.stream.cancelled:
            self._long_prefills.popleft()
            if job.runner is not None and not job.runner.dead:
                job.runner.throw(GreenletExit)
            self._end_unstarted(job.stream, "cancelled")
            return
        try:
            ended, prefilled = self._advance(job, lambda: self._batch.prefill([job.stream.request], pause=self._pause))
        except Exception:
            self._long_prefills.popleft()
            log.exception("a reply failed to start")
            self._end_unstarted(job.stream, "failed")
            return
        if not ended:
            return
        self._long_prefills.popleft()
        self._add(prefilled, [job.stream])
        self._hand_out()

    def _add(self, prefilled: Prefilled, streams: list[ReplyStream]) -> None:
        for row, stream in zip(self._batch.add(prefilled), streams):
            self._streams[id(row)] = stream

    def _slice(self) -> None:
        """Carry on with the oldest compression until its slice is used up and a reply waits, or it ends."""
        job = self._compressions[0]
        try:
            ended, result = self._advance(job, lambda: job.compressor.absorb(job.state, job.texts, job.replay,
                                                                             self._pause, job.progress))
        except Exception as e:  # the caller gets the error; replies are not touched
            self._compressions.popleft()
            job.future.set_exception(e)
            return
        if ended:
            self._compressions.popleft()
            job.future.set_result(result)

    def _advance(self, job: _Compression | _LongPrefill, work: Callable[[], object]) -> tuple[bool, object]:
        """Run the job's greenlet (made to run `work` the first time) for one slice: whether it
        ended, and what work returned then; raises what work raised."""
        if job.runner is None:
            job.runner = greenlet(work)
        self._slice_ends = time.perf_counter() + self.slice_seconds
        result = job.runner.switch()
        return job.runner.dead, result

    def _pause(self) -> None:
        """Called inside a compression or long prefill before each decoder layer: step aside at
        once for a reply that waits to join (its first token is what its user waits for), and once
        the slice is used up for the replies being decoded (the loop switches back into it at the
        next slice)."""
        joining = self._inbox and len(self._batch) + len(self._long_prefills) < self.max_rows
        if joining or (self._batch.rows and time.perf_counter() >= self._slice_ends):
            greenlet.getcurrent().parent.switch()

    def _fail_batch(self) -> None:
        for row in self._batch.rows:
            row.finish = row.finish or "failed"
        try:
            self._hand_out()
        except Exception:  # the batch itself is broken: end the streams by hand, start afresh
            log.exception("could not end the failed replies cleanly")
            for row in self._batch.rows:
                stream = self._streams.pop(id(row), None)
                if stream is not None:
                    self._end_unstarted(stream, "failed")
            self._batch = DecodeBatch(self.engine)

    @staticmethod
    def _ended_early(stream: ReplyStream) -> bool:
        """Ends a waiting stream that was cancelled before it started; whether it was."""
        if stream.cancelled:
            InferenceLoop._end_unstarted(stream, "cancelled")
        return stream.cancelled

    @staticmethod
    def _end_unstarted(stream: ReplyStream, finish: str) -> None:
        stream._end(Reply((), "", finish, len(stream.request.prompt), None, time.perf_counter() - stream.submitted))

    def _shut(self) -> None:
        """At stop: running and waiting replies end as stopped (their readers tell their clients
        the server is stopping, rather than store half a reply), compressions fail."""
        for row in self._batch.rows:
            row.finish = row.finish or "stopped"
        try:
            self._hand_out()
        except Exception:
            log.exception("could not end the running replies cleanly")
            for stream in self._streams.values():
                self._end_unstarted(stream, "stopped")
        for job in self._long_prefills:  # before the compressions: a prefill runs inside a paused one
            if job.runner is not None and not job.runner.dead:
                job.runner.throw(GreenletExit)
            self._end_unstarted(job.stream, "stopped")
        self._long_prefills.clear()
        with self._wake:
            waiting, self._inbox = list(self._inbox), deque()
            compressions, self._compressions = list(self._compressions), deque()
        for stream in waiting:
            self._end_unstarted(stream, "stopped")
        for job in compressions:
            if job.runner is not None and not job.runner.dead:
                job.runner.throw(GreenletExit)  # unwinds the paused pass (its locks and hooks) here
            job.future.set_exception(LoopStopped("the inference loop stopped"))
