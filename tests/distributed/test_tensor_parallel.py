"""Tensor parallelism on CPU (gloo, spawned worker processes): tokens equal the single-process engine.

Dense: TP=2 must reproduce TP=1 exactly. Sparse: each rank selects among its own heads and neurons
(per-rank top-k), which a TP=1 engine reproduces with SparsityConfig(selection_shards=N); TP=N must
match that engine token for token.
"""
from __future__ import annotations

import pytest
import torch

from polarsparse import LLM, SamplingParams
from polarsparse.config import SparsityConfig
from polarsparse.errors import PolarsparseError
from tests.sparsity.tiny import save_tiny_with_tokenizer, tiny_pipeline

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 17, 42, 9], [100, 3, 250, 7, 7, 31, 64, 12, 99], [8] * 20]


def tokens(llm, prompts=PROMPTS, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def both(folder, tp, **kw):
    """(single-process engine, tensor-parallel engine) results on the same prompts."""
    one_kw = {**kw, **kw.pop("one", {})}
    one_kw.pop("one", None)
    one = LLM(str(folder), device="cpu", dtype="float32", num_kv_blocks=32, block_size=16, **one_kw)
    want, want_logits = tokens(one), one.prompt_logits(PROMPTS)
    with LLM(str(folder), device="cpu", dtype="float32", num_kv_blocks=32, block_size=16,
             tensor_parallel_size=tp, **kw) as many:
        got, got_logits = tokens(many), many.prompt_logits(PROMPTS)
        assert many.engine.runner.cache.layers[0][0].shape[1] == one.engine.cfg.num_kv_heads // tp
    return want, got, want_logits, got_logits


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_dense_tp2_matches_single_process(kind, tiny_run, tmp_path):
    folder = tiny_run["model"] if kind == "llama" else save_tiny_with_tokenizer("opt", tmp_path / "opt")
    want, got, want_logits, got_logits = both(folder, 2)
    assert got == want
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sparse_tp2_matches_per_shard_selection(tiny_run):
    sparsity = SparsityConfig(head_density=0.5, mlp=True, mlp_density=0.25)
    one = {"sparsity": SparsityConfig(head_density=0.5, mlp=True, mlp_density=0.25, selection_shards=2)}
    want, got, _, _ = both(tiny_run["model"], 2, routers=str(tiny_run["routers"]), sparsity=sparsity, one=one)
    assert got == want
    dense = LLM(str(tiny_run["model"]), device="cpu", dtype="float32", num_kv_blocks=32, block_size=16)
    assert tokens(dense) != want, "the sparse run should differ from dense somewhere (else it tests nothing)"


EMBEDDED_PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 9519, 2114, 253, 655]]
SHORT = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("routers", [None, "default"], ids=["dense", "sparse"])
def test_embedded_model_tp3(routers):
    """SmolLM2 has 9 query / 3 KV heads, so 3 is its smallest tensor-parallel size. Sparse uses the
    shipped router bundle; TP=1 reproduces the per-rank selection with selection_shards=3."""
    one = LLM(routers=routers, sparsity=SparsityConfig(selection_shards=3), device="cpu", num_kv_blocks=16)
    want = tokens(one, EMBEDDED_PROMPTS, SHORT)
    with LLM(routers=routers, device="cpu", num_kv_blocks=16, tensor_parallel_size=3) as tp:
        assert tokens(tp, EMBEDDED_PROMPTS, SHORT) == want


def test_indivisible_heads_are_a_clear_error(tiny_run):
    with pytest.raises(PolarsparseError, match="not divisible by the tensor-parallel size 3"):
        LLM(str(tiny_run["model"]), device="cpu", tensor_parallel_size=3)


def test_step_views_carry_only_the_tokens_a_step_feeds():
    """Workers get the fed tokens, not the history: a decode view of a 5000-token sequence holds one
    token; a chunked-prefill view holds the rest of the prompt; both slice like the sequence."""
    import pickle

    from polarsparse.distributed.executor import view_seq
    from polarsparse.engine.sequence import Sequence

    seq = Sequence("r", 0, list(range(4000)), GREEDY, output_token_ids=list(range(4000, 5000)),
                   block_table=list(range(313)), num_computed=4999)
    view = view_seq(seq)
    assert (view.window, view.last_token, view.num_tokens) == ([4999], 4999, 5000)
    assert view.tokens(4999, 5000) == seq.token_ids[4999:5000]
    assert len(pickle.dumps(view)) < 2000  # the block table dominates
    with pytest.raises(ValueError, match="not sent"):
        view.tokens(10, 12)
    seq.output_token_ids, seq.num_computed = [], 1000  # half-prefilled prompt
    view = view_seq(seq)
    assert view.tokens(1000, 1500) == seq.token_ids[1000:1500] == seq.tokens(1000, 1500)
    assert seq.tokens(3990, 4000) == list(range(3990, 4000))
    seq.output_token_ids = [7, 8]
    assert seq.tokens(3998, 4002) == [3998, 3999, 7, 8] and seq.tokens(4001, 4002) == [8] and seq.last_token == 8


def test_eval_tp2_matches_single_process(tiny_run, tmp_path):
    """`polarsparse eval --tensor-parallel-size 2`: dense metrics equal TP=1's; a sparse variant equals
    a TP=1 engine selecting per shard (selection_shards=2) scored by the same harness."""
    import dataclasses
    import json

    from polarsparse.engine.engine import LLMEngine
    from polarsparse.eval.cli import parse_variant
    from polarsparse.eval.harness import EvalSettings, evaluate
    from tests.sparsity.tiny import run_cli

    variants = "dense,kv:0.5+mlp:0.25"
    out = tmp_path / "tp2.json"
    assert run_cli("eval", "--model", tiny_run["model"], "--device", "cpu", "--routers", tiny_run["routers"],
                   "--tasks", "ppl,piqa", "--limit", 2, "--ppl-windows", 2, "--ppl-window", 48, "--ppl-context", 16,
                   "--batch-size", 4, "--variants", variants, "--tensor-parallel-size", 2, "--json", out) == 0
    got = json.loads(out.read_text())
    settings = EvalSettings(2, 4, 2, 48, 16)
    sparse = dataclasses.replace(parse_variant("kv:0.5+mlp:0.25"), selection_shards=2)
    want = evaluate(LLMEngine(str(tiny_run["model"]), device="cpu"), ["ppl", "piqa"], {"dense": None}, settings)
    one = LLMEngine(str(tiny_run["model"]), device="cpu", routers=str(tiny_run["routers"]), sparsity=sparse)
    want_sparse = evaluate(one, ["ppl", "piqa"], {"kv:0.5+mlp:0.25": one.runner.planner_factory}, settings)
    for task in ("ppl", "piqa"):
        metrics = got["tasks"][task]["metrics"]
        for name, ref in (("dense", want[task].metrics["dense"]), ("kv:0.5+mlp:0.25", want_sparse[task].metrics["kv:0.5+mlp:0.25"])):
            assert metrics[name] == pytest.approx(ref, rel=1e-4), (task, name)
    assert got["tasks"]["ppl"]["metrics"]["dense"] != got["tasks"]["ppl"]["metrics"]["kv:0.5+mlp:0.25"]
    assert "--tensor-parallel-size 2" in got["meta"]["command"]
