"""Servers for the serving tests: real uvicorn on a free loopback port, in a thread, stopped at the end."""
from __future__ import annotations

import contextlib

import pytest

from polarsparse.config import EngineConfig
from polarsparse.engine.engine import LLMEngine
from polarsparse.serve.server import ServerThread, make_app
from tests.helpers import add_default_tokenizer, save_tiny

TINY_VOCAB = 49152  # the default tokenizer's vocabulary, so text and chat work on the tiny model
CONTEXT = 2048  # long enough that a stream is still running when a test disconnects


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("tiny-serve"), vocab_size=TINY_VOCAB, num_key_value_heads=2,
                       max_position_embeddings=CONTEXT)
    return add_default_tokenizer(folder)


def tiny_engine(folder, **ecfg) -> LLMEngine:
    ecfg = {"block_size": 16, "num_kv_blocks": 160, **ecfg}
    return LLMEngine(str(folder), dtype="float32", device="cpu", engine_config=EngineConfig(**ecfg))


@contextlib.contextmanager
def serving(engine: LLMEngine, api_key: str | None = None, name: str = "tiny"):
    app = make_app(engine, [name], "dense", api_key)
    with ServerThread(app) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_server(tiny_folder):
    """A tiny-model server shared by a module's tests (they must leave it idle)."""
    with serving(tiny_engine(tiny_folder), api_key="test-key") as server:
        yield server
