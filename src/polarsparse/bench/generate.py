"""`polarsparse bench generate`: prefill and decode throughput of our engine next to transformers'
generate, on the same prompts, in the same run. On CPU this is a sanity check, not the speed story."""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

SOURCE_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
    "father had taught him. From the lamp room he could see the whole bay: the fishing boats coming home, "
    "the gulls circling the harbour, and far out, the dark line where the sea met the sky. "
)


@dataclass
class Row:
    engine: str
    batch: int
    prompt_tokens: int
    output_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        return self.batch * (self.output_tokens - 1) / self.decode_s


def add_arguments(p: argparse.ArgumentParser) -> None:
    from polarsparse.cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per sequence")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where JSON + markdown go")
    p.add_argument("--name", default=None, help="result file stem (default generate-<device>)")


def run(args) -> int:
    from polarsparse.engine.llm import LLM

    batches = [int(b) for b in args.batch.split(",")]
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=max(batches))
    prompt = _prompt_ids(llm.tokenizer, args.prompt_len)
    hf = None if args.no_hf else _load_hf(llm)
    rows: list[Row] = []
    for b in tqdm(batches, desc="bench generate", unit="batch"):
        rows.append(bench_ours(llm, prompt, b, args.output_len))
        if hf is not None:
            rows.append(bench_hf(hf, prompt, b, args.output_len, llm.engine.device))
    meta = _meta(llm, args)
    _report(rows, meta, args.out, args.name or f"generate-{llm.engine.device.type}")
    return 0


def _prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(SOURCE_TEXT * (1 + n // 40))
    return ids[:n]


def bench_ours(llm, prompt: list[int], batch: int, out_len: int) -> Row:
    from polarsparse.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    eng = llm.engine
    for _ in range(batch):
        eng.add_request(list(prompt), params)
    prefill = decode = 0.0
    while eng.has_unfinished():
        eng.step()
        if eng.last_step.is_decode:
            decode += eng.last_step.seconds
        else:
            prefill += eng.last_step.seconds
    return Row("polarsparse", batch, len(prompt), out_len, prefill, decode)


def _load_hf(llm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llm.engine.model_path), dtype=llm.engine.dtype)
    return model.to(llm.engine.device).eval()


@torch.no_grad()
def bench_hf(model, prompt: list[int], batch: int, out_len: int, device) -> Row:
    ids = torch.tensor([prompt] * batch, device=device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, attention_mask=mask, pad_token_id=0)
    # warm up at the measured batch size: transformers 5.24 fails (a shape error in o_proj) when one
    # model's generate runs batch 1 and then batch 2 with identical prompt rows
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, **kw)
    total = time.perf_counter() - t0
    return Row("transformers", batch, len(prompt), out_len, prefill, max(total - prefill, 1e-9))


def _meta(llm, args) -> dict:
    dev = llm.engine.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return {
        "date": datetime.date.today().isoformat(),
        "device": f"{dev.type}: {name}",
        "threads": torch.get_num_threads(),
        "model": llm.engine.model_path.name,
        "dtype": str(llm.engine.dtype),
        "torch": torch.__version__,
        "command": "polarsparse bench generate " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in (("batch", args.batch), ("prompt_len", args.prompt_len), ("output_len", args.output_len))
        ),
    }


def _report(rows: list[Row], meta: dict, out: Path, stem: str) -> None:
    table = Table(title=f"generate throughput ({meta['device']}, {meta['model']}, {meta['dtype']})")
    for col in ("engine", "batch", "prefill tok/s", "decode tok/s", "decode ms/step"):
        table.add_column(col, justify="right")
    lines = ["| engine | batch | prefill tok/s | decode tok/s | decode ms/step |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        step_ms = 1000 * r.decode_s / (r.output_tokens - 1)
        cells = (r.engine, str(r.batch), f"{r.prefill_tok_s:.0f}", f"{r.decode_tok_s:.1f}", f"{step_ms:.1f}")
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "rows": [asdict(r) | {"prefill_tok_s": r.prefill_tok_s, "decode_tok_s": r.decode_tok_s} for r in rows]}
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    header = [f"# bench generate: {meta['model']} on {meta['device']}", "",
              f"Date {meta['date']}, dtype {meta['dtype']}, torch {meta['torch']}, {meta['threads']} threads.",
              f"Command: `{meta['command']}`", ""]
    (out / f"{stem}.md").write_text("\n".join(header + lines) + "\n")
