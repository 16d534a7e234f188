"""Drive one LLMEngine from a background thread and fan its outputs out to asyncio consumers.

The engine is not thread-safe, so exactly one thread (``polarsparse-engine``) touches it: it applies
queued commands (add / abort), runs ``step()``, and hands each RequestOutput to the event loop of the
request that owns it. HTTP handlers only enqueue commands and await their own asyncio.Queue. An abort
(client gone) is applied before the next step, so its KV blocks are free within one step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from polarsparse.engine.engine import LLMEngine, RequestOutput
from polarsparse.engine.sampling import SamplingParams
from polarsparse.errors import PolarsparseError

log = logging.getLogger(__name__)


class EngineDeadError(PolarsparseError, RuntimeError):
    """The engine loop stopped (a bug in a step, or shutdown); in-flight requests fail with this."""


@dataclass
class _Sink:
    """Where one HTTP request's outputs go (shared by its prompts)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the request's loop is closed: nobody is listening any more
            pass


@dataclass
class _Add:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams


@dataclass
class StepReport:
    """What one engine step did, for metrics (passed to the ``on_step`` hook in the engine thread)."""

    is_decode: bool
    batch_size: int
    num_tokens: int  # tokens fed through the model
    generated: int  # tokens sampled
    seconds: float


class AsyncEngine:
    """Thread-owned LLMEngine with an asyncio front.

    on_step: optional hook called in the engine thread after every step with a StepReport.
    """

    def __init__(self, engine: LLMEngine, on_step: Callable[[StepReport], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self.dead: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sinks: dict[str, _Sink] = {}
        self._generated: dict[str, int] = {}  # engine thread only: tokens seen per request
        self._thread = threading.Thread(target=self._run, name="polarsparse-engine", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.dead is None and self._thread.is_alive() and not self._stop.is_set()

    # -- requests (event-loop side) ----------------------------------------------------------
    async def generate(
        self, prompts: list[list[int]], params: SamplingParams, request_id: str
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (prompt index, latest output) until every prompt has finished.

        Leaving early (client gone, cancellation, error) aborts whatever is still running.
        """
        if not self.healthy:
            raise EngineDeadError(f"the engine is not running ({self.dead or 'shut down'})")
        rids = [f"{request_id}-{i}" for i in range(len(prompts))]
        index = {rid: i for i, rid in enumerate(rids)}
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        for rid in rids:
            self._sinks[rid] = sink
        self._send(_Add(rids, prompts, params))
        pending = set(rids)
        try:
            while pending:
                for out in await _latest(sink.queue):
                    if out.finished:
                        pending.discard(out.request_id)
                    yield index[out.request_id], out
        finally:
            for rid in rids:
                self._sinks.pop(rid, None)
            if pending:
                self.abort(pending)

    def abort(self, request_ids) -> None:
        for rid in request_ids:
            self._send(("abort", rid))

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as e:  # a bug inside a step: fail everyone loudly, stay down
            log.exception("engine loop crashed; the server stops accepting requests")
            self.dead = e
        finally:
            self._fail_all(EngineDeadError(f"the engine stopped: {self.dead or 'server shutting down'}"))

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                self._add(cmd)
            else:
                self._abort_now(cmd[1])

    def _add(self, cmd: _Add) -> None:
        added = []
        try:
            for rid, ids in zip(cmd.request_ids, cmd.prompts):
                if rid not in self._sinks:  # the client left before we got here
                    continue
                self.engine.add_request(ids, cmd.params, rid)
                added.append(rid)
                self._generated[rid] = 0
        except PolarsparseError as e:  # validated before, but never leave a half-added request
            for rid in added:
                self._abort_now(rid)
            sink = self._sinks.get(cmd.request_ids[0])
            if sink is not None:
                sink.put(e)

    def _abort_now(self, rid: str) -> None:
        self.engine.abort(rid)
        self._generated.pop(rid, None)

    def _step(self) -> None:
        before, t0 = self.engine.last_step, time.perf_counter()
        outputs = self.engine.step()
        stats = self.engine.last_step
        if stats is before:  # nothing could be scheduled: wait for an abort or a finish
            self._wake.wait(0.01)
            return
        report = StepReport(stats.is_decode, stats.num_seqs, stats.num_tokens, 0, time.perf_counter() - t0)
        for out in outputs:
            total = sum(len(c.token_ids) for c in out.outputs)
            report.generated += total - self._generated.get(out.request_id, 0)
            self._generated[out.request_id] = total
            if out.finished:
                self._generated.pop(out.request_id, None)
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink.put(out)
        if self.on_step is not None:
            self.on_step(report)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        for sink in {id(s): s for s in list(self._sinks.values())}.values():
            sink.put(error)


async def _latest(q: asyncio.Queue) -> list:
    """Wait for at least one item, then take everything queued; keep only the newest output per
    request (outputs are cumulative snapshots). Errors are raised."""
    items = [await q.get()]
    while not q.empty():
        items.append(q.get_nowait())
    newest: dict[str, RequestOutput] = {}
    for item in items:
        if isinstance(item, BaseException):
            raise item
        newest[item.request_id] = item
    return list(newest.values())
