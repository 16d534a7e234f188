"""The ``polarsparse`` command. Thin: parses arguments and calls library code.

Subcommands other than ``generate`` live next to their implementation: a module listed in
``COMMANDS`` exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from polarsparse.errors import PolarsparseError

# (command path, module, help). Modules are imported only when their command runs.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("bench", "generate"), "polarsparse.bench.generate", "CPU/GPU generate throughput vs transformers"),
    (("bench", "kernels"), "polarsparse.bench.kernels", "selective attention / MLP kernels vs dense (GPU)"),
    (("routers", "collect"), "polarsparse.sparsity.collect", "record router inputs, active neurons and head norms"),
    (("routers", "train"), "polarsparse.sparsity.train", "train per-layer MLP and head routers into a bundle"),
    (("routers", "calibrate"), "polarsparse.sparsity.calibrate", "per-layer, per-batch-size top-k tables"),
    (("eval",), "polarsparse.eval.cli", "perplexity and zero-shot accuracy, dense vs sparse"),
    (("bench", "decode"), "polarsparse.bench.decode", "decode latency/throughput: dense, sparse, transformers, roofline"),
    (("serve",), "polarsparse.serve.server", "OpenAI-compatible HTTP server (completions, chat, SSE, metrics)"),
    (("bench", "serve"), "polarsparse.bench.serve", "serving load test: TTFT/TPOT/ITL/E2E, dense vs sparse"),
]

DEMO_HINT = 'e.g. polarsparse generate --prompt "The capital of France is"'


class CLIError(PolarsparseError):
    """Bad command-line usage detected after parsing."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PolarsparseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; a listed command's module is imported only when ``argv`` selects it."""
    words = [a for a in (argv or []) if not a.startswith("-")]
    p = argparse.ArgumentParser(
        prog="polarsparse",
        description="Batched LLM inference with contextual sparsity that scales with batch size (Polar Sparsity).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    _add_generate(sub)
    prep = sub.add_parser("prepare-default-model", help="convert the embedded default model once (install step)")
    prep.add_argument("--force", action="store_true", help="convert again even if cached")
    prep.set_defaults(func=_prepare_default)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_ in COMMANDS:
        parent = sub
        for part in path[:-1]:
            if part not in groups:
                grp = sub.add_parser(part, help=f"{part} subcommands")
                groups[part] = grp.add_subparsers(title=f"{part} commands", metavar="COMMAND")
            parent = groups[part]
        cmd = parent.add_parser(path[-1], help=help_, description=help_)
        if words[: len(path)] == list(path):
            _load_arguments(cmd, module)
    return p


def _load_arguments(cmd: argparse.ArgumentParser, module: str) -> None:
    mod = importlib.import_module(module)
    mod.add_arguments(cmd)
    cmd.set_defaults(func=mod.run)


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model/--dtype/--device, shared by every command that loads a model."""
    p.add_argument("--model", default=None, help="Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over N ranks (N GPUs, or N CPU processes with gloo); default 1")


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    """--routers/--dense and sparsity overrides (decode steps only; prefill is always dense)."""
    p.add_argument("--routers", default=None, help="router bundle directory, or 'default' (default: the bundle "
                   "shipped for the embedded model when --model is not given, else dense)")
    p.add_argument("--dense", action="store_true", help="ignore routers: run every decode step dense")
    p.add_argument("--head-density", type=float, default=None, help="fraction of heads kept per sequence "
                   "(default: the bundle's, 0.5)")
    p.add_argument("--head-unit", choices=("kv", "query"), default=None,
                   help="select KV groups (what the GPU kernel serves; default) or query heads (reference path)")
    p.add_argument("--sparse-mlp", choices=("on", "off"), default=None,
                   help="MLP top-k from the bundle's batch-size table (default: the bundle's choice)")


def routers_from_args(args) -> tuple[str | None, "SparsityConfig | None"]:
    """(routers, sparsity overrides) for LLM(...) from add_router_arguments' flags."""
    from polarsparse.config import SparsityConfig
    from polarsparse.sparsity.runtime import implicit_routers

    if args.dense:
        return None, None
    routers = args.routers if args.routers is not None else implicit_routers(args.model)
    mlp = None if args.sparse_mlp is None else args.sparse_mlp == "on"
    return routers, SparsityConfig(head_density=args.head_density, head_unit=args.head_unit, mlp=mlp)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")


def sampling_from_args(args):
    from polarsparse.engine.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )


def _add_generate(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="generate text for one or more prompts",
        description="Generate text. One prompt streams to the terminal; several run as one batch. "
        "Tokens/s are printed at the end. " + DEMO_HINT,
    )
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    g.add_argument("--prompts-file", type=Path, help='JSONL file: one {"prompt": "..."} or {"messages": [...]} per line')
    g.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    g.add_argument("--output", type=Path, help="write results as JSONL here")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences decoded together")
    add_model_arguments(g)
    add_parallel_arguments(g)
    add_router_arguments(g)
    add_sampling_arguments(g)
    g.set_defaults(func=_generate)


def read_prompts_file(path: Path) -> list[str | list[dict]]:
    """Each line: {"prompt": str} or {"messages": [...]} or a JSON string."""
    if not path.is_file():
        raise CLIError(f"prompts file not found: {path}")
    prompts: list[str | list[dict]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(obj, str):
            prompts.append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            prompts.append(obj["messages"])
        else:
            raise CLIError(f'{path}:{n}: expected a string, {{"prompt": "..."}} or {{"messages": [...]}}')
    if not prompts:
        raise CLIError(f"{path} has no prompts")
    return prompts


def _generate(args) -> int:
    prompts: list = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise CLIError("no prompt given; " + DEMO_HINT)
    params = sampling_from_args(args)
    from polarsparse.engine.llm import LLM

    routers, sparsity = routers_from_args(args)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs, routers=routers,
              sparsity=sparsity, tensor_parallel_size=args.tensor_parallel_size)
    print(f"[{llm.engine.sparse_setup.describe()}]", file=sys.stderr)
    inputs = [_to_input(llm, p, args.chat) for p in prompts]
    t0 = time.perf_counter()
    if len(inputs) == 1 and params.n == 1:
        outs = [_stream_one(llm, inputs[0], params)]
    else:
        outs = llm.generate(inputs, params, use_tqdm=sys.stderr.isatty())
        for i, o in enumerate(outs):
            print(f"--- [{i}] {o.outputs[0].finish_reason}\n{o.outputs[0].text}")
    elapsed = time.perf_counter() - t0
    ntok = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print(f"\n[{len(outs)} prompt(s), {ntok} tokens in {elapsed:.2f} s: {ntok / elapsed:.1f} tokens/s, "
          f"model {llm.engine.model_path.name}, {llm.engine.dtype}, {llm.engine.device}]", file=sys.stderr)
    if args.output:
        _write_outputs(args.output, outs)
    return 0


def _to_input(llm, prompt, chat: bool):
    if isinstance(prompt, list):
        return llm.apply_chat_template(prompt)
    return llm.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt


def _stream_one(llm, prompt, params):
    shown, last = 0, None
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next token
            continue
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown, last = len(text), out
    sys.stdout.write(last.outputs[0].text[shown:] + "\n")
    return last


def _write_outputs(path: Path, outs) -> None:
    with path.open("w") as f:
        for o in outs:
            c = o.outputs[0]
            f.write(json.dumps({"prompt": o.prompt, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}) + "\n")


def _prepare_default(args) -> int:
    from polarsparse.models.embedded import prepare_default_model

    print(f"default model ready: {prepare_default_model(force=args.force)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
