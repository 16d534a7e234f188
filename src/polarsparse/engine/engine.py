"""LLMEngine: requests in, one step at a time, outputs (with text deltas) out.

The offline API (llm.py) loops over ``step()``; the server drives the same engine from its own loop.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polarsparse.config import ConfigError, EngineConfig, SparsityConfig, resolve_dtype
from polarsparse.distributed.executor import ParallelRunner, Workers, start_rank0
from polarsparse.distributed.state import SINGLE, TensorParallel, rank_device
from polarsparse.engine.detok import update_text
from polarsparse.engine.runner import ModelRunner
from polarsparse.engine.sampling import Sampler, SamplingParams, make_generator
from polarsparse.engine.scheduler import AdmissionError, ScheduledBatch, Scheduler
from polarsparse.engine.sequence import Sequence
from polarsparse.models.base import CausalLM
from polarsparse.models.loader import check_shardable, load_model, resolve_model_path
from polarsparse.sparsity.runtime import build_sparse_setup

log = logging.getLogger(__name__)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival: float
    first_token_time: float | None = None


@dataclass
class StepStats:
    """What the last step did (for progress bars, metrics and benchmarks)."""

    is_decode: bool = False
    num_seqs: int = 0
    num_tokens: int = 0
    seconds: float = 0.0


class LLMEngine:
    def __init__(
        self,
        model: str | CausalLM | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        engine_config: EngineConfig | None = None,
        tokenizer=None,
        routers: str | Path | None = None,
        sparsity: SparsityConfig | None = None,
    ):
        """routers: None (dense), "default" (the bundle shipped for the embedded model) or a router
        bundle directory; sparsity: overrides of the bundle's defaults (head density/unit, MLP on/off)."""
        self.ecfg = engine_config or EngineConfig()
        self.workers: Workers | None = None
        if isinstance(model, CausalLM):  # an in-memory model (random-weight benchmarks, tests)
            if self.ecfg.tensor_parallel_size > 1:
                raise ConfigError("tensor parallelism needs a model folder: every rank loads its own shard")
            self.model_path = Path(f"<in-memory {model.cfg.model_type}>")
            runner, self.sparse_setup = runner_for(model, self.model_path, self.ecfg, routers, sparsity)
        else:
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.model_path = resolve_model_path(model)
            runner, self.sparse_setup = self._start_ranks(resolve_dtype(dtype, device), device, routers, sparsity)
        self.runner, self.model = runner, runner.model
        self.device, self.dtype = runner.device, runner.dtype
        self.cfg = self.model.cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_path)
        self.max_model_len = min(self.ecfg.max_model_len or self.cfg.max_model_len, self.cfg.max_model_len)
        self.scheduler = Scheduler(self.ecfg, self.runner.cache, self.max_model_len)
        self.sampler = Sampler(self.device, self.ecfg.seed)
        self.eos_ids = set(self.cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, _Request] = {}
        self.last_step = StepStats()
        self.sparsity: SparsityConfig = self.sparse_setup.config
        self._ids = itertools.count()

    def _start_ranks(self, dtype: torch.dtype, device: torch.device, routers, sparsity):
        """Rank 0's runner; with tensor_parallel_size > 1 the other ranks are spawned first."""
        size = self.ecfg.tensor_parallel_size
        if size == 1:
            return build_rank_runner(self.model_path, dtype, device, self.ecfg, routers, sparsity, SINGLE)
        check_shardable(self.model_path, size)
        spec = dict(model_path=str(self.model_path), dtype=dtype, device=device.type, engine_config=self.ecfg,
                    routers=routers, sparsity=sparsity)
        tp, self.workers = start_rank0(size, spec)
        runner, setup = build_rank_runner(self.model_path, dtype, device, self.ecfg, routers, sparsity, tp)
        return ParallelRunner(runner, self.workers), setup

    def close(self) -> None:
        """Free the KV cache and graphs and stop tensor-parallel workers. The engine cannot run afterwards."""
        self.runner.release()  # first: graphs that captured NCCL calls keep the communicator from being destroyed
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> str:
        """Queue a prompt (text or token ids). Raises AdmissionError if it can never run."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        text, ids = (None, list(prompt)) if isinstance(prompt, list) else (prompt, self.encode(prompt))
        self.scheduler.check_admissible(len(ids))
        if any(not 0 <= t < self.cfg.vocab_size for t in ids):
            raise AdmissionError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        seqs = [
            Sequence(request_id, i, ids, params, make_generator(None if params.seed is None else params.seed + i, self.device))
            for i in range(params.n)
        ]
        self.requests[request_id] = _Request(request_id, text, ids, seqs, time.perf_counter())
        for s in seqs:
            self.scheduler.add(s)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for s in req.seqs:
            if not s.finished:
                s.finish("abort")
            self.scheduler.release(s)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise AdmissionError(f"{self.model_path} has no tokenizer files: give prompts as token ids")
        return self.tokenizer.encode(text, add_special_tokens=True)

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Dense logits [T_i, V] for every position of each token-id prompt (one prefill batch).

        Runs beside (not inside) the scheduler: call it when no request is in flight.
        """
        seqs = [Sequence(f"score-{i}", 0, list(p), SamplingParams(max_tokens=1)) for i, p in enumerate(prompts)]
        alloc = self.runner.cache.allocator
        try:
            for s in seqs:
                self.scheduler.check_admissible(s.num_tokens)
                s.block_table = alloc.allocate(self.runner.cache.blocks_for(s.num_tokens))
            return self.runner.prompt_logits(seqs)
        finally:
            for s in seqs:
                alloc.free(s.block_table)

    # -- stepping ---------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduler step; return outputs of the requests that changed (``finished_only``:
        of those that finished, which skips building text nobody streams)."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        touched = {s.request_id for s in batch.finished}
        if batch.seqs:
            logits = self.runner.execute(batch)
            sampling = [s for i, s in enumerate(batch.seqs) if batch.is_decode or batch.samples(i)]
            self.scheduler.commit(batch)
            tokens = self.sampler(logits, [s.params for s in sampling], [s.generator for s in sampling]).tolist()
            for seq, tok in zip(sampling, tokens):
                self._append(seq, tok)
                touched.add(seq.request_id)
        self.last_step = StepStats(batch.is_decode, len(batch.seqs), sum(batch.query_lens), time.perf_counter() - t0)
        outs = (self.requests[r] for r in touched if r in self.requests)
        return [self._output(q) for q in outs if not finished_only or all(s.finished for s in q.seqs)]

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_token_ids.append(token)
        req = self.requests[seq.request_id]
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        self._check_stop(seq, token)
        if seq.finished:
            self.scheduler.release(seq)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p, n_out = seq.params, len(seq.output_token_ids)
        if p.stop_strings:
            self._check_stop_strings(seq)
            if seq.finished:
                return
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                return seq.finish("stop", token)
            if not p.ignore_eos and token in self.eos_ids:
                return seq.finish("stop", token)
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish("length")

    def _check_stop_strings(self, seq: Sequence) -> None:
        if self.tokenizer is None:
            return
        searched = len(seq.text)
        text = update_text(self.tokenizer, seq)
        start = max(0, searched - max(len(s) for s in seq.params.stop_strings))  # a stop may span old and new text
        for stop in seq.params.stop_strings:
            at = text.find(stop, start)
            if at >= 0 and len(seq.output_token_ids) >= seq.params.min_tokens:
                seq.text = text[: at + len(stop)] if seq.params.include_stop_str_in_output else text[:at]
                seq.text_final = True
                seq.finish("stop", stop)
                return

    def _output(self, req: _Request) -> RequestOutput:
        outs = [
            CompletionOutput(s.index, self.text_of(s), list(s.output_token_ids), s.finish_reason, s.stop_reason)
            for s in req.seqs
        ]
        finished = all(s.finished for s in req.seqs)
        metrics = {"arrival": req.arrival, "first_token": req.first_token_time}
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, metrics)

    def text_of(self, seq: Sequence) -> str:
        """The sequence's text so far (decoding only its new tokens; see engine/detok.py)."""
        if self.tokenizer is None:
            return ""
        if not seq.text_final:
            update_text(self.tokenizer, seq, final=seq.finished)
            seq.text_final = seq.finished
        return seq.text


def runner_for(model: CausalLM, model_path: Path, ecfg: EngineConfig, routers, sparsity):
    """A ModelRunner for ``model`` (on its weights' device and dtype) with its routers attached."""
    weight = model.lm_head_weight()
    runner = ModelRunner(model, ecfg, weight.dtype, weight.device)
    setup = build_sparse_setup(model, model_path, routers, sparsity, weight.device, weight.dtype)
    runner.planner_factory = setup.factory
    return runner, setup


def build_rank_runner(model_path, dtype: torch.dtype, device, ecfg: EngineConfig, routers, sparsity,
                      tp: TensorParallel):
    """Load this rank's shard and build its runner: rank 0 and every worker do exactly this."""
    model = load_model(Path(model_path), dtype, rank_device(torch.device(device), tp.rank), tp)
    return runner_for(model, Path(model_path), ecfg, routers, sparsity)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path):
    """The folder's HF tokenizer, or None when it has none (random-weight benchmark models)."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        log.warning("%s has no tokenizer: prompts must be token ids", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


__all__ = ["LLMEngine", "RequestOutput", "CompletionOutput", "AdmissionError", "ScheduledBatch"]
