import pytest

from tests.sparsity.tiny import save_tiny_with_tokenizer, tiny_pipeline


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """{"model", "data", "routers"} directories of a tiny collect -> train -> calibrate run."""
    return tiny_pipeline(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory):
    return save_tiny_with_tokenizer("opt", tmp_path_factory.mktemp("tiny-opt"))
