"""The transformers baseline of the decode benchmark: ``generate`` on the same shape, random weights.

Settings, fastest first: a static KV cache with transformers' own torch.compile of the decode step
(its default for a static cache on CUDA; compiled once per batch shape), else the static cache
eagerly. Per-step time = (time of a generate that decodes 1 + S tokens - time of one that decodes
1 token) / S, both with the same cache length so a compiled step is reused; each point records
the settings it ran with and why a faster one was not used.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from polarsparse.config import ModelConfig
from polarsparse.models.synthetic import hf_config

log = logging.getLogger(__name__)


@dataclass
class HFResult:
    batch: int
    context: int
    step_s: float | None
    settings: str
    note: str = ""


def build_hf_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    """A transformers model of ``cfg`` with its own random init, built on ``device``."""
    import transformers as tf

    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


class _StopAfter:
    """Stopping criterion: stop once ``n`` new tokens exist (keeps max_length, so the cache shape)."""

    def __init__(self, n: int, prompt_len: int):
        self.n, self.prompt_len = n, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = input_ids.shape[1] - self.prompt_len >= self.n
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _generate_seconds(model, ids: torch.Tensor, new_tokens: int, max_new: int, compile_: bool) -> float:
    from transformers import StoppingCriteriaList

    _sync(ids.device)
    t0 = time.perf_counter()
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
        cache_implementation="static", disable_compile=not compile_, pad_token_id=0, eos_token_id=None,
        stopping_criteria=StoppingCriteriaList([_StopAfter(new_tokens, ids.shape[1])]),
    )
    _sync(ids.device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_hf_step(model, batch: int, context: int, steps: int, compile_: bool, seed: int = 0) -> float:
    """Seconds per decode step of ``model.generate`` at (batch, context)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=gen).to(device)
    max_new = steps + 2
    _generate_seconds(model, ids, 2, max_new, compile_)  # warm-up (compiles when compile_)
    short = _generate_seconds(model, ids, 1, max_new, compile_)
    long = _generate_seconds(model, ids, 1 + steps, max_new, compile_)
    return max(long - short, 0.0) / steps


def run_baseline(model, points: list[tuple[int, int]], steps: int, compile_: bool) -> list[HFResult]:
    """Time every (batch, context) point, eagerly or with transformers' torch.compile."""
    out = []
    for batch, context in points:
        settings = ("static cache + torch.compile (transformers' auto-compile, reduce-overhead)" if compile_
                    else "static cache, eager (disable_compile=True)")
        step, note, t0 = None, "", time.perf_counter()
        try:
            step = time_hf_step(model, batch, context, steps, compile_)
            if compile_:
                note = f"compile + warm-up + timing took {time.perf_counter() - t0:.0f} s"
        except torch.OutOfMemoryError:
            note = "out of GPU memory"
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - a failed compile is a result to record, not a crash
            if not compile_:
                raise
            note = f"torch.compile failed ({type(exc).__name__}: {str(exc)[:160]})"
            log.warning("transformers compile failed at B=%d: %s", batch, exc)
        log.info("transformers B=%d ctx=%d: %s ms/step (%s)", batch, context,
                 "-" if step is None else f"{step * 1e3:.2f}", settings)
        out.append(HFResult(batch, context, step, settings, note))
    return out
