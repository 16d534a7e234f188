"""Run one OpenAI generation request on the AsyncEngine: whole responses and SSE streams.

A choice's index is ``prompt_index * n + sample_index`` (OpenAI's order for batched prompts).
Streaming sends text deltas; while a choice runs, the last ``len(longest stop string) - 1``
characters and any incomplete UTF-8 character are held back, so text that a stop string later
removes is never sent.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from pydantic import BaseModel
from starlette.requests import Request

from polarsparse.engine.engine import CompletionOutput, RequestOutput
from polarsparse.errors import PolarsparseError
from polarsparse.serve.async_engine import AsyncEngine
from polarsparse.serve.errors import APIError, server_error
from polarsparse.serve.inputs import GenerationInput
from polarsparse.serve.metrics import ServingMetrics
from polarsparse.serve.protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChatMessageOut, ChatStreamChoice, CompletionChoice,
    CompletionResponse, DeltaMessage, Usage,
)

log = logging.getLogger(__name__)


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    first: bool


class DeltaTracker:
    """What of one choice's cumulative output has not been sent yet."""

    def __init__(self, index: int, holdback: int):
        self.index, self.holdback = index, holdback
        self.sent_chars = self.sent_tokens = 0
        self.done = False

    def advance(self, c: CompletionOutput) -> Delta | None:
        if self.done:
            return None
        finished = c.finish_reason is not None
        end = len(c.text) if finished else _stable_end(c.text, self.holdback)
        text = c.text[self.sent_chars:end] if end > self.sent_chars else ""
        ids = c.token_ids[self.sent_tokens:]
        first = self.sent_chars == 0 and self.sent_tokens == 0
        self.sent_chars, self.sent_tokens = max(self.sent_chars, end), len(c.token_ids)
        self.done = finished
        if not text and not ids and not finished:
            return None
        return Delta(self.index, text, ids, c.finish_reason, first)


def _stable_end(text: str, holdback: int) -> int:
    end = len(text)
    while end and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character: wait for its last byte
        end -= 1
    return max(0, end - holdback)


@dataclass
class Format:
    """How one endpoint spells its responses."""

    chat: bool
    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def final(self, choices: list[tuple[int, CompletionOutput]], usage: Usage, with_ids: bool) -> BaseModel:
        ids = lambda c: c.token_ids if with_ids else None  # noqa: E731
        if self.chat:
            return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model, usage=usage, choices=[
                ChatChoice(index=i, message=ChatMessageOut(content=c.text), finish_reason=c.finish_reason, token_ids=ids(c))
                for i, c in choices])
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, usage=usage, choices=[
            CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason, token_ids=ids(c)) for i, c in choices])

    def chunk(self, d: Delta, with_ids: bool) -> BaseModel:
        ids = d.token_ids if with_ids else None
        if self.chat:
            delta = DeltaMessage(role="assistant" if d.first else None, content=d.text if d.text or d.first else None)
            return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=[
                ChatStreamChoice(index=d.index, delta=delta, finish_reason=d.finish_reason, token_ids=ids)])
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=[
            CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason, token_ids=ids)])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        return cls(id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage)


class GenerationRun:
    """One HTTP generation request from admission to its last byte, with its metrics."""

    def __init__(self, aengine: AsyncEngine, metrics: ServingMetrics, inp: GenerationInput, chat: bool, model: str):
        self.aengine, self.metrics, self.inp = aengine, metrics, inp
        prefix = "chatcmpl" if chat else "cmpl"
        self.fmt = Format(chat, f"{prefix}-{uuid.uuid4().hex}", model)
        self.endpoint = "chat" if chat else "completions"
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.outcome = "aborted"
        self.n = inp.params.n
        stops = inp.params.stop_strings
        self.holdback = max((len(s) for s in stops), default=1) - 1 if not inp.params.include_stop_str_in_output else 0
        self.final: dict[int, CompletionOutput] = {}

    # -- shared -----------------------------------------------------------------------------
    async def _outputs(self) -> AsyncIterator[tuple[int, CompletionOutput]]:
        async for p_idx, out in self.aengine.generate(self.inp.prompts, self.inp.params, self.fmt.request_id):
            self._saw(out)
            for c in out.outputs:
                idx = p_idx * self.n + c.index
                self.final[idx] = c
                yield idx, c

    def _saw(self, out: RequestOutput) -> None:
        if self.first_token is None and any(c.token_ids for c in out.outputs):
            self.first_token = time.perf_counter()

    def usage(self) -> Usage:
        prompt = sum(len(p) for p in self.inp.prompts)
        completion = sum(len(c.token_ids) for c in self.final.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _record(self) -> None:
        now = time.perf_counter()
        ttft = None if self.first_token is None else self.first_token - self.start
        done = self.outcome not in ("aborted", "error")
        self.metrics.request_done(self.endpoint, self.outcome, sum(len(p) for p in self.inp.prompts),
                                  ttft if done else None, now - self.start if done else None)

    def _finish_outcome(self) -> str:
        reasons = {c.finish_reason for c in self.final.values()}
        return "length" if "length" in reasons else "stop"

    # -- whole response ---------------------------------------------------------------------
    async def respond(self, request: Request) -> BaseModel | None:
        """The full response, or None if the client left first (its requests are aborted)."""
        try:
            collect = asyncio.ensure_future(self._collect())
            gone = asyncio.ensure_future(_wait_disconnect(request))
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():
                collect.cancel()
                await asyncio.gather(collect, return_exceptions=True)
                return None
            gone.cancel()
            collect.result()
            self.outcome = self._finish_outcome()
            choices = sorted(self.final.items())
            return self.fmt.final(choices, self.usage(), self.inp.return_token_ids)
        except PolarsparseError as e:
            self.outcome = "error"
            raise e if isinstance(e, APIError) else server_error(str(e), 503) from e
        finally:
            self._record()

    async def _collect(self) -> None:
        async for _ in self._outputs():
            pass

    # -- stream -----------------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events; cancelled (client gone) -> the engine aborts the request."""
        trackers: dict[int, DeltaTracker] = {}
        try:
            async for idx, c in self._outputs():
                tracker = trackers.setdefault(idx, DeltaTracker(idx, self.holdback))
                delta = tracker.advance(c)
                if delta is not None:
                    yield _sse(self.fmt.chunk(delta, self.inp.return_token_ids))
            if self.inp.include_usage:
                yield _sse(self.fmt.usage_chunk(self.usage()))
            self.outcome = self._finish_outcome()
        except PolarsparseError as e:
            self.outcome = "error"
            log.warning("stream %s failed: %s", self.fmt.request_id, e)
            err = e if isinstance(e, APIError) else server_error(str(e), 503)
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            self._record()
        yield "data: [DONE]\n\n"


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"
