"""The router bundle shipped for the embedded default model: present, small, valid, used by default."""
from __future__ import annotations

import torch

from polarsparse.models.embedded import default_model_dir
from polarsparse.models.loader import load_model
from polarsparse.sparsity.bundle import RouterBundle
from polarsparse.sparsity.runtime import default_bundle_dir, implicit_routers
from tests.sparsity.tiny import run_cli


def test_shipped_bundle_is_small_calibrated_and_made_for_the_embedded_model():
    path = default_bundle_dir()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 20 * 2**20
    bundle = RouterBundle.load(path)
    bundle.check_model(load_model(default_model_dir(), torch.float32, torch.device("cpu")))
    cal = bundle.calibration
    assert cal["buckets"] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert bundle.manifest["training"]["data"]["data"] == "train"  # CoQA + SQuAD, disjoint from eval text
    assert implicit_routers(None) == "default"


def test_generate_uses_the_shipped_routers_by_default_and_says_so(capsys):
    assert run_cli("generate", "--device", "cpu", "--prompt", "The capital of France is", "--max-tokens", 3) == 0
    err = capsys.readouterr().err
    assert "sparse decode, routers" in err and "SmolLM2-135M-Instruct" in err and "heads kv 50%" in err
    assert run_cli("generate", "--device", "cpu", "--dense", "--prompt", "Hi", "--max-tokens", 2) == 0
    assert "dense (no routers)" in capsys.readouterr().err
