"""A deterministic random "checkpoint" for ``synthetic:`` model specs.

It answers the loader's questions exactly like :class:`polarsparse.models.loader.CheckpointReader`
(tensors by Hugging Face name, optionally only this tensor-parallel rank's slice), so a synthetic
model goes through the same Recipe / shard machinery as a real one. Every tensor is drawn from its
own seed (the spec's seed and the tensor's name), on the target device and in the target dtype:
each rank draws the whole tensor and keeps its slice, so the shards of a TP=N model are exact
slices of the TP=1 model on the same kind of device (CUDA and CPU generators differ).

Values follow transformers' initialisation: norm scales 1 and norm biases 0, other biases
N(0, 0.005), matrices N(0, 0.02) (as :func:`polarsparse.models.synthetic.random_model`).
"""
from __future__ import annotations

import functools
import zlib

import torch

from polarsparse.distributed.state import SINGLE, TensorParallel
from polarsparse.models.synthetic import INIT_STD, SyntheticSpec, hf_config


@functools.lru_cache(maxsize=8)
def hf_tensor_shapes(spec: SyntheticSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of the spec's model (transformers' own model, built on meta)."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(hf_config(spec.config()))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def tensor_seed(spec_seed: int, name: str) -> int:
    """A stable per-tensor seed (the same in every process and on every run)."""
    return zlib.crc32(f"{spec_seed}:{name}".encode())


def _is_norm(name: str) -> bool:
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]  # "model.layers.0.input_layernorm.weight" -> input_layernorm
    return "norm" in module


class _TensorView:
    """A tensor seen through safetensors' slice interface (what the loader's shard reader takes)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.t[index]


class SyntheticCheckpoint:
    """Random HF-named tensors for ``spec``, generated on ``device`` in ``dtype``."""

    def __init__(self, spec: SyntheticSpec, dtype: torch.dtype, device: torch.device):
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        self.shapes = hf_tensor_shapes(spec)

    def __enter__(self) -> "SyntheticCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (KeyError if the model has none of that name)."""
        shape = self.shapes[name]
        if _is_norm(name):
            fill = 1.0 if name.endswith("weight") else 0.0
            return torch.full(shape, fill, dtype=self.dtype, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(tensor_seed(self.spec.seed, name))
        std = INIT_STD if len(shape) > 1 else INIT_STD / 4
        return torch.empty(shape, dtype=self.dtype, device=self.device).normal_(0.0, std, generator=gen)

    def get(self, name: str, shard: int | None = None, pad: bool = False, tp: TensorParallel = SINGLE) -> torch.Tensor:
        """Same contract as CheckpointReader.get: the tensor, or this rank's slice along ``shard``."""
        from polarsparse.models.loader import ModelLoadError, _read_shard

        if name not in self.shapes:
            raise ModelLoadError(f"{self.spec}: the model has no tensor {name!r}")
        full = self.tensor(name)
        if shard is None or tp.size == 1:
            return full
        return _read_shard(_TensorView(full), shard, pad, tp).clone()  # clone: free the rest of the tensor
