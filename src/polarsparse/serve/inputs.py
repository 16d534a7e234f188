"""Turn a validated OpenAI request into engine inputs: prompt token ids and SamplingParams.

Every check that depends on the model (context length, vocabulary, tokenizer, chat template) lives
here and raises :class:`~polarsparse.serve.errors.APIError`, so nothing invalid reaches the engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ValidationError

from polarsparse.engine.engine import LLMEngine
from polarsparse.engine.sampling import SamplingParams, SamplingParamsError
from polarsparse.engine.scheduler import AdmissionError
from polarsparse.serve.errors import APIError, bad_request, from_validation
from polarsparse.serve.protocol import ChatCompletionRequest, CompletionRequest

MAX_PROMPTS_PER_REQUEST = 256
DEFAULT_COMPLETION_TOKENS = 16  # the OpenAI default for /v1/completions

Req = TypeVar("Req", bound=BaseModel)


def _neutral(default: Any = None) -> Callable[[Any], bool]:
    return lambda v: v is None or v == default


# field -> "is this value one we honour?" (anything else is refused, never ignored)
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": _neutral(0),
    "frequency_penalty": _neutral(0),
    "logit_bias": lambda v: not v,
    "suffix": _neutral(""),
    "echo": _neutral(False),
    "logprobs": lambda v: v in (None, False),
    "best_of": _neutral(1),
    "top_logprobs": _neutral(0),
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: True,  # meaningless without tools, which are refused
    "response_format": lambda v: v is None or v == {"type": "text"},
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": _neutral(),
    "prediction": _neutral(),
    "store": _neutral(False),
    "metadata": lambda v: not v,
    "service_tier": lambda v: v in (None, "auto", "default"),
    "reasoning_effort": _neutral(),
}


@dataclass
class GenerationInput:
    """What the engine runs for one HTTP request (one engine request per prompt)."""

    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    return_token_ids: bool


def parse_body(model: type[Req], body: bytes) -> Req:
    """Strict UTF-8 JSON -> request model, or a 400 that says what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    try:
        if not isinstance(json.loads(text), dict):
            raise bad_request("the request body must be a JSON object", code="invalid_json")
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at position {e.pos}", code="invalid_json") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        raise from_validation(e) from None


def check_supported(req: BaseModel) -> None:
    for name, ok in UNSUPPORTED.items():
        if name in type(req).model_fields and not ok(getattr(req, name)):
            raise bad_request(f"'{name}' is not supported by this server (value {getattr(req, name)!r})",
                              name, "unsupported_parameter")


def completion_input(req: CompletionRequest, engine: LLMEngine) -> GenerationInput:
    check_supported(req)
    prompts = [_prompt_ids(p, engine) for p in _split_prompts(req.prompt)]
    return _generation_input(req, prompts, req.max_tokens, DEFAULT_COMPLETION_TOKENS, engine, "prompt")


def chat_input(req: ChatCompletionRequest, engine: LLMEngine) -> GenerationInput:
    check_supported(req)
    ids = chat_prompt_ids(req, engine)
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise bad_request("give max_completion_tokens or max_tokens, not two different values", "max_tokens")
    limit = req.max_completion_tokens or req.max_tokens
    return _generation_input(req, [ids], limit, None, engine, "messages")


def chat_prompt_ids(req: ChatCompletionRequest, engine: LLMEngine) -> list[int]:
    tok = engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise bad_request("this model has no chat template: use /v1/completions", "messages", "no_chat_template")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # jinja raises its own errors for conversations a template rejects
        raise bad_request(f"the chat template rejected these messages: {e}", "messages") from None
    return list(ids)


def _split_prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("the prompt is empty", "prompt", "empty_prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    if len(prompt) > MAX_PROMPTS_PER_REQUEST:
        raise bad_request(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompt)}", "prompt")
    return list(prompt)


def _prompt_ids(prompt: str | list[int], engine: LLMEngine) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("the prompt is empty", "prompt", "empty_prompt")
        if engine.tokenizer is None:
            raise bad_request("this model has no tokenizer: send the prompt as token ids", "prompt", "no_tokenizer")
        return engine.encode(prompt)
    if not prompt:
        raise bad_request("the prompt is empty", "prompt", "empty_prompt")
    vocab = engine.cfg.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt", "invalid_token_id")
    return prompt


def _generation_input(req, prompts: list[list[int]], max_tokens: int | None, default: int | None,
                      engine: LLMEngine, prompt_param: str) -> GenerationInput:
    longest = max(len(p) for p in prompts)
    room = engine.max_model_len - longest
    for p in prompts:
        _check_admissible(p, engine, prompt_param)
    if max_tokens is None:
        max_tokens = room if default is None else min(default, room)
    elif longest + max_tokens > engine.max_model_len:
        raise bad_request(
            f"this model's maximum context length is {engine.max_model_len} tokens; you requested "
            f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} in the completion): "
            f"reduce max_tokens to at most {room}", "max_tokens", "context_length_exceeded")
    if req.stop and engine.tokenizer is None:
        raise bad_request("stop strings need a tokenizer; this model has none (use stop_token_ids)", "stop")
    try:
        params = SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=-1 if req.top_k is None else req.top_k,
            max_tokens=max_tokens, min_tokens=req.min_tokens, seed=req.seed, stop=req.stop,
            stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
    except SamplingParamsError as e:
        raise bad_request(str(e), str(e).split(" ", 1)[0], "invalid_value") from None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    return GenerationInput(prompts, params, req.stream, include_usage, req.return_token_ids)


def _check_admissible(ids: list[int], engine: LLMEngine, param: str) -> None:
    try:
        engine.scheduler.check_admissible(len(ids))
    except AdmissionError as e:
        code = "context_length_exceeded" if len(ids) >= engine.max_model_len else "invalid_prompt"
        raise APIError(str(e), 400, param, code) from None
