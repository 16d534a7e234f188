"""Tiny real-architecture models with a small trained tokenizer, for fast router/eval tests on CPU."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import save_tiny

TEXT = (
    "The quick brown fox jumps over the lazy dog. A farmer kept horses in a barn near the river. "
    "Question: What is the capital of France?\nAnswer: Paris is the capital of France. "
    "Cotton the kitten lived above the barn with her mother and five sisters, all white and fluffy. "
    "Scientists measure the temperature of water as it boils and freezes in the laboratory. "
)
VOCAB = 320


def save_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with VOCAB tokens (eos = 0), saved as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)


def save_tiny_with_tokenizer(kind: str, folder: Path, **overrides) -> Path:
    """A tiny random ``kind`` model (llama: GQA 4 query / 2 KV heads) plus a tokenizer."""
    if kind == "opt":
        overrides = {"vocab_size": VOCAB, "eos_token_id": 0, **overrides}
    else:
        overrides = {"vocab_size": VOCAB, "num_key_value_heads": 2, "eos_token_id": 0, "bos_token_id": None,
                     **overrides}
    save_tiny(kind, folder, **overrides)
    save_tokenizer(folder)
    return folder


def run_cli(*argv: str) -> int:
    from polarsparse.cli import main

    return main([str(a) for a in argv])


def tiny_pipeline(base: Path) -> dict[str, Path]:
    """collect -> train -> calibrate on a tiny GQA llama through the CLI, once per test session
    (directories under the session's base temp dir are reused by later callers)."""
    root = base / "tiny-pipeline"
    paths = {"model": root / "model", "data": root / "data", "routers": root / "routers"}
    if (paths["routers"] / "manifest.json").is_file() and "calibration" in (paths["routers"] / "manifest.json").read_text():
        return paths
    save_tiny_with_tokenizer("llama", paths["model"])
    assert run_cli("routers", "collect", "--model", paths["model"], "--device", "cpu", "--data", "coqa",
                   "--tokens", 2048, "--window", 64, "--holdout", 0.25, "--keep", 0.7, "--out", paths["data"]) == 0
    assert run_cli("routers", "train", "--data", paths["data"], "--out", paths["routers"], "--rank", 16,
                   "--epochs", 2, "--batch", 256) == 0
    assert run_cli("routers", "calibrate", "--routers", paths["routers"], "--data", paths["data"],
                   "--k-multiple", 16, "--samples", 4, "--density-limit", 1.0, "--mlp-default", "on") == 0
    return paths


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """{"model", "data", "routers"} directories of a tiny collect -> train -> calibrate run."""
    return tiny_pipeline(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory):
    """A tiny OPT (MHA, ReLU) folder with a tokenizer."""
    return save_tiny_with_tokenizer("opt", tmp_path_factory.mktemp("tiny-opt"))


def synthetic_bundle(model_dir: Path, out: Path, mlp_fraction: float = 1.0, rank: int = 8) -> Path:
    """A calibrated bundle of untrained routers for ``model_dir`` (every bucket keeps ``mlp_fraction``
    of the neurons): enough to drive the engine without collecting data (GPU tests)."""
    import torch

    from polarsparse.models.loader import load_model
    from polarsparse.sparsity.bundle import RouterBundle, model_identity
    from polarsparse.sparsity.planner import BATCH_BUCKETS
    from polarsparse.sparsity.train import StackedRouters, export_tensors

    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    cfg = model.cfg
    stacked = StackedRouters(cfg.num_layers, cfg.hidden_size, rank, cfg.intermediate_size, cfg.num_heads,
                             cfg.num_kv_heads)
    stats = (torch.zeros(cfg.num_layers, cfg.hidden_size), torch.ones(cfg.num_layers, cfg.hidden_size))
    k = int(cfg.intermediate_size * mlp_fraction)
    manifest = {
        "model": {**model_identity(model), "name": Path(model_dir).name},
        "routers": {"mlp_rank": rank, "hidden": cfg.hidden_size, "neurons": cfg.intermediate_size,
                    "head_units": {"kv": cfg.num_kv_heads, "query": cfg.num_heads}},
        "calibration": {"settings": {"k_multiple": 16}, "buckets": list(BATCH_BUCKETS),
                        "mlp_k": {str(b): [k] * cfg.num_layers for b in BATCH_BUCKETS}},
        "defaults": {"mlp": True},
    }
    RouterBundle(manifest, export_tensors(stacked, *stats)).save(out)
    return out
