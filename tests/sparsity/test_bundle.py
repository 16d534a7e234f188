"""Router bundles: round trip, and clear errors for the wrong model, a damaged file, a newer format."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from polarsparse.models.loader import load_model
from polarsparse.sparsity.bundle import FORMAT_VERSION, BundleError, RouterBundle
from polarsparse.sparsity.runtime import build_sparse_setup


@pytest.fixture
def bundle_copy(tiny_run, tmp_path):
    dst = tmp_path / "routers"
    shutil.copytree(tiny_run["routers"], dst)
    return dst


def _model(path):
    return load_model(path, torch.float32, torch.device("cpu"))


def test_round_trip_keeps_tensors_and_tables(tiny_run, tmp_path):
    bundle = RouterBundle.load(tiny_run["routers"])
    again = RouterBundle.load(bundle.save(tmp_path / "copy"))
    assert again.tensors.keys() == bundle.tensors.keys()
    for name, t in bundle.tensors.items():
        assert torch.equal(again.tensors[name], t), name
    assert again.calibration["mlp_k"] == bundle.calibration["mlp_k"]
    assert again.manifest["model"] == bundle.manifest["model"]


def test_manifest_records_what_the_issue_asks_for(tiny_run):
    m = RouterBundle.load(tiny_run["routers"]).manifest
    assert m["format_version"] == FORMAT_VERSION
    assert len(m["model"]["fingerprint"]) == 64
    assert m["routers"]["head_units"] == {"kv": 2, "query": 4}
    assert m["training"]["data"]["data"] == "coqa" and m["training"]["heldout_stats"]["mlp_recall"]
    assert set(m["calibration"]["mlp_k"]) == {str(b) for b in m["calibration"]["buckets"]}


def test_bundle_for_another_model_is_refused(tiny_run, tiny_opt):
    bundle = RouterBundle.load(tiny_run["routers"])
    bundle.check_model(_model(tiny_run["model"]))  # its own model: fine
    with pytest.raises(BundleError, match="built for another model.*num_layers|built for another model.*family"):
        bundle.check_model(_model(tiny_opt))


def test_truncated_tensor_file_is_refused(bundle_copy):
    f = bundle_copy / "routers.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(BundleError, match="truncated or modified"):
        RouterBundle.load(bundle_copy)


def test_newer_format_version_is_refused(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="newer than this polarsparse supports"):
        RouterBundle.load(bundle_copy)


def test_missing_and_corrupt_manifest(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="not found"):
        RouterBundle.load(tmp_path / "nope")
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        RouterBundle.load(bundle_copy)


def test_uncalibrated_bundle_cannot_drive_an_engine(bundle_copy, tiny_run):
    bundle = RouterBundle.load(bundle_copy)
    del bundle.manifest["calibration"]
    bundle.save_manifest()
    model = _model(tiny_run["model"])
    with pytest.raises(BundleError, match="not calibrated"):
        build_sparse_setup(model, tiny_run["model"], bundle_copy, None, "cpu", torch.float32)


def test_default_routers_are_only_for_the_embedded_model(tiny_run):
    model = _model(tiny_run["model"])
    with pytest.raises(BundleError, match="default router bundle is for SmolLM2"):
        build_sparse_setup(model, tiny_run["model"], "default", None, "cpu", torch.float32)
