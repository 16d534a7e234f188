"""Bad input on the command line: a clear one-line error and exit code 2, never a traceback."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from polarsparse.cli import main
from tests.helpers import add_default_tokenizer, save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("tiny"), vocab_size=49152, max_position_embeddings=64)
    return add_default_tokenizer(folder)


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def expect_error(capsys, fragment, *argv):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert fragment in err, err
    assert "Traceback" not in err


def copy_of(tiny, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny, dst)
    return dst


def test_missing_model_dir(capsys, tmp_path):
    expect_error(capsys, "model directory not found", "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")


def test_folder_without_config(capsys, tmp_path):
    expect_error(capsys, "config.json is missing", "generate", "--model", str(tmp_path), "--prompt", "hi")


def test_unsupported_architecture(capsys, tiny, tmp_path):
    m = copy_of(tiny, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (m / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, "unsupported architecture", "generate", "--model", str(m), "--prompt", "hi")


def test_missing_weight_files(capsys, tiny, tmp_path):
    m = copy_of(tiny, tmp_path)
    (m / "model.safetensors").unlink()
    expect_error(capsys, "no *.safetensors weight files", "generate", "--model", str(m), "--prompt", "hi")


def test_corrupt_weight_file(capsys, tiny, tmp_path):
    m = copy_of(tiny, tmp_path)
    (m / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    expect_error(capsys, "corrupt", "generate", "--model", str(m), "--prompt", "hi")


def test_missing_tensor_and_wrong_shape(capsys, tiny, tmp_path):
    m = copy_of(tiny, tmp_path)
    tensors = load_file(m / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, m / "model.safetensors")
    expect_error(capsys, "model.layers.1.mlp.up_proj.weight", "generate", "--model", str(m), "--prompt", "hi")
    tensors = load_file(tiny / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, m / "model.safetensors")
    expect_error(capsys, "shape", "generate", "--model", str(m), "--prompt", "hi")


def test_prompt_longer_than_context(capsys, tiny):
    expect_error(capsys, "context", "generate", "--model", str(tiny), "--prompt", "word " * 200)


@pytest.mark.parametrize("flags,fragment", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--max-tokens", "0"], "max_tokens"),
])
def test_invalid_sampling_parameters(capsys, tiny, flags, fragment):
    expect_error(capsys, fragment, "generate", "--model", str(tiny), "--prompt", "hi", *flags)


def test_malformed_prompts_file(capsys, tiny, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{not json\n')
    expect_error(capsys, "p.jsonl:2", "generate", "--model", str(tiny), "--prompts-file", str(f))
    expect_error(capsys, "no prompt given", "generate", "--model", str(tiny))


def test_generate_batch_from_file_writes_jsonl(capsys, tiny, tmp_path):
    f, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    f.write_text('{"prompt": "Hello"}\n"Bye"\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    code, stdout, err = run(capsys, "generate", "--model", str(tiny), "--prompts-file", str(f), "--max-tokens", "4",
                            "--ignore-eos", "--output", str(out))
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["token_ids"]) == 4 for r in rows)
    assert "tokens/s" in err
