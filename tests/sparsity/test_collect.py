"""Collected rows are what the model computes, and an interrupted collection resumes to the same data."""
from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from polarsparse.engine.engine import LLMEngine
from polarsparse.eval.scoring import dense_prefill
from polarsparse.eval.tasks import load_corpus
from polarsparse.sparsity.activity import neuron_contributions
from polarsparse.sparsity.collect import CollectSettings, split_windows
from polarsparse.sparsity.store import ActivationStore
from tests.sparsity.tiny import run_cli


def test_rows_are_the_models_router_inputs_and_active_neurons(tiny_run):
    store = ActivationStore.open(tiny_run["data"])
    engine = LLMEngine(str(tiny_run["model"]), device="cpu")
    settings = CollectSettings(**store.meta["settings"])
    train, _ = split_windows(engine.tokenizer, load_corpus(settings.data), settings)
    layer = engine.model.layers[1]
    seen = {}
    hooks = [layer.attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].clone())),
             layer.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))]
    with dense_prefill(engine.runner, [tuple(train[1])]):
        pass
    for h in hooks:
        h.remove()
    w = settings.window
    stored = torch.from_numpy(store.arrays["router_inputs"][w:2 * w, 1].astype(np.float32))
    torch.testing.assert_close(stored, seen["h"], atol=2e-3, rtol=2e-3)
    active = neuron_contributions(layer.mlp, seen["x"]) > store.meta["activity"]["thresholds"][1]
    labels = torch.from_numpy(store.mlp_labels(slice(w, 2 * w), 1))
    assert (labels == active).float().mean() > 0.999  # fp16-free path: only ties at the threshold may differ


def test_interrupted_collection_resumes_to_identical_data(tiny_run, tmp_path):
    partial = tmp_path / "data"
    shutil.copytree(tiny_run["data"], partial)
    meta = json.loads((partial / "meta.json").read_text())
    done = meta["tokens_done"]
    meta["tokens_done"] = done // 2  # as if the run stopped halfway
    (partial / "meta.json").write_text(json.dumps(meta))
    store = ActivationStore.open(partial, writable=True)
    store.arrays["router_inputs"][done // 2:] = 0
    store.arrays["router_inputs"].flush()
    s = meta["settings"]
    assert run_cli("routers", "collect", "--model", tiny_run["model"], "--device", "cpu", "--data", s["data"],
                   "--tokens", s["tokens"], "--window", s["window"], "--holdout", s["holdout"], "--keep", s["keep"],
                   "--out", partial) == 0
    again, orig = ActivationStore.open(partial), ActivationStore.open(tiny_run["data"])
    assert again.tokens_done == done
    # same windows, possibly batched differently: equal up to fp16 rounding
    np.testing.assert_allclose(again.arrays["router_inputs"].astype(np.float32),
                               orig.arrays["router_inputs"].astype(np.float32), atol=2e-3, rtol=2e-3)
    assert (again.mlp_labels(slice(None)) == orig.mlp_labels(slice(None))).mean() > 0.999


def test_other_settings_do_not_resume_into_the_same_directory(tiny_run, capsys):
    rc = run_cli("routers", "collect", "--model", tiny_run["model"], "--device", "cpu", "--data", "coqa",
                 "--tokens", 4096, "--out", tiny_run["data"])
    assert rc == 2 and "other settings" in capsys.readouterr().err


def test_relu_models_label_exactly_the_positive_post_activations(tiny_opt, tmp_path):
    out = tmp_path / "opt-data"
    assert run_cli("routers", "collect", "--model", tiny_opt, "--device", "cpu", "--data", "squad", "--tokens", 512,
                   "--window", 64, "--holdout", 0.25, "--out", out) == 0
    store = ActivationStore.open(out)
    assert store.meta["activity"]["kind"] == "relu" and store.meta["activity"]["thresholds"] == [0.0, 0.0]
    engine = LLMEngine(str(tiny_opt), device="cpu")
    settings = CollectSettings(**store.meta["settings"])
    train, _ = split_windows(engine.tokenizer, load_corpus(settings.data), settings)
    mlp = engine.model.layers[0].mlp
    seen = {}
    hook = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    with dense_prefill(engine.runner, [tuple(train[0])]):
        pass
    hook.remove()
    fires = torch.relu(torch.nn.functional.linear(seen["x"], mlp.w1, mlp.b1)) > 0
    assert torch.equal(torch.from_numpy(store.mlp_labels(slice(0, 64), 0)), fires)
