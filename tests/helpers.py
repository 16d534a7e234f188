"""Tiny real-architecture models built with transformers, saved as HF folders, for equivalence tests."""
from __future__ import annotations

from pathlib import Path

import torch

TINY_LLAMA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
TINY_OPT = dict(
    vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
)


def save_tiny(kind: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Build a random HF model of ``kind`` (llama, qwen2, mistral, opt), save it, return the folder."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "opt":
        cfg = tf.OPTConfig(**{**TINY_OPT, **overrides})
        model = tf.OPTForCausalLM(cfg)
    else:
        config_cls, model_cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        }[kind]
        cfg = config_cls(**{**TINY_LLAMA, **overrides})
        model = model_cls(cfg)
    _randomize_norms(model)
    model.save_pretrained(folder)
    return folder


def _randomize_norms(model) -> None:
    """Norm weights start at 1 and biases at 0: perturb them so a mixed-up mapping cannot pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)


def load_hf(folder: Path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def random_prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def add_default_tokenizer(folder: Path) -> Path:
    """Copy the embedded model's tokenizer into ``folder`` (model vocab must be >= 49152)."""
    import shutil

    from polarsparse.models.embedded import prepare_default_model

    src = prepare_default_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    return folder
