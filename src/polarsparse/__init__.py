"""polarsparse: batched LLM inference with contextual sparsity that scales (Polar Sparsity)."""

__version__ = "0.1.0"
