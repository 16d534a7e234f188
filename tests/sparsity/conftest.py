"""Fixtures shared with tests/eval: a tiny trained router bundle and a tiny OPT."""
from tests.sparsity.tiny import tiny_opt, tiny_run  # noqa: F401
