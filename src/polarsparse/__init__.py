"""polarsparse: batched LLM inference with contextual sparsity that scales (Polar Sparsity).

Public API (vLLM style)::

    from polarsparse import LLM, SamplingParams
    llm = LLM()                       # embedded default model, or LLM("path/to/hf-folder")
    outs = llm.generate(["Hello"] * 8, SamplingParams(max_tokens=32, temperature=0.7))
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "PolarsparseError"]


def __getattr__(name: str):
    # Lazy so that `import polarsparse` (and the CLI's --help) stays fast.
    if name == "LLM":
        from polarsparse.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from polarsparse.engine.sampling import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from polarsparse.engine import engine

        return getattr(engine, name)
    if name == "EngineConfig":
        from polarsparse.config import EngineConfig

        return EngineConfig
    if name == "PolarsparseError":
        from polarsparse.errors import PolarsparseError

        return PolarsparseError
    raise AttributeError(f"module 'polarsparse' has no attribute {name!r}")
