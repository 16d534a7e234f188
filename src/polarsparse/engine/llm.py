"""The offline API, vLLM style: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

from typing import Iterator, Sequence as Seq

import torch
from tqdm.auto import tqdm

from polarsparse.config import EngineConfig, SparsityConfig
from polarsparse.engine.engine import LLMEngine, RequestOutput
from polarsparse.engine.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """Load a model once; generate for many prompts with continuous batching.

    model: a Hugging Face folder, or None / "default" for the embedded SmolLM2-135M-Instruct.
    dtype: "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16".
    routers: None (dense), "default" (the bundle shipped for the embedded model) or a bundle folder.
    sparsity: a SparsityConfig (or a dict of its fields) overriding the bundle's defaults, e.g.
      ``{"head_density": 0.3, "head_unit": "query", "mlp": True}``.
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        routers: str | None = None,
        sparsity: SparsityConfig | dict | None = None,
        **engine_kwargs,
    ):
        if isinstance(sparsity, dict):
            sparsity = SparsityConfig(**sparsity)
        self.engine = LLMEngine(model, dtype=dtype, device=device, engine_config=EngineConfig(**engine_kwargs),
                                routers=routers, sparsity=sparsity)

    def close(self) -> None:
        """Release tensor-parallel worker processes (no-op otherwise)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order."""
        prompts = _as_list(prompts)
        params = _broadcast(sampling_params, len(prompts))
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(p, sp))
        except BaseException:
            self._abort(ids)  # a bad prompt rejects the whole call and leaves nothing queued
            raise
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req")
        try:
            for out in self._drain(finished_only=True):
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        except BaseException:
            self._abort(ids)
            raise
        finally:
            bar.close()
        return [done[r] for r in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that changed it (the last one is finished)."""
        rid = self.engine.add_request(prompt, sampling_params or SamplingParams())
        try:
            for out in self._drain():
                if out.request_id == rid:
                    yield out
        finally:
            self.engine.abort(rid)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Dense logits [T_i, V] (fp32) at every position of each token-id prompt."""
        return self.engine.prompt_logits(prompts)

    def _abort(self, ids: list[str]) -> None:
        for rid in ids:
            self.engine.abort(rid)

    def _drain(self, finished_only: bool = False) -> Iterator[RequestOutput]:
        while self.engine.has_unfinished():
            yield from self.engine.step(finished_only)


def _as_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], int):
        return [prompts]
    return list(prompts)


def _broadcast(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
