"""``polarsparse serve``: build the engine, start its loop, run uvicorn. Also an in-process server
thread (:class:`ServerThread`) for tests and the serving benchmark."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time

from polarsparse.config import EngineConfig
from polarsparse.engine.engine import LLMEngine
from polarsparse.errors import PolarsparseError
from polarsparse.serve.async_engine import AsyncEngine
from polarsparse.serve.metrics import ServingMetrics

log = logging.getLogger(__name__)


class ServeError(PolarsparseError):
    """The server cannot start as asked (bad option, port in use, missing feature)."""


# -- engine ---------------------------------------------------------------------------------------
def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Model, routers and batching options shared by `serve` and `bench serve`."""
    from polarsparse.cli import add_model_arguments, add_parallel_arguments, add_router_arguments

    add_model_arguments(p)
    add_parallel_arguments(p)
    add_router_arguments(p)
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prompt tokens per prefill step")
    p.add_argument("--max-model-len", type=int, default=None, help="cap the context (default: the model's)")
    p.add_argument("--block-size", type=int, default=32, choices=(16, 32, 64), help="KV tokens per block")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks (overrides --kv-cache-memory)")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache budget: GPU fraction of free memory (default 0.9) / CPU GiB (default 0.9)")


def engine_config_from_args(args) -> EngineConfig:
    kw = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
              tensor_parallel_size=args.tensor_parallel_size)
    if args.kv_cache_memory is not None:
        kw["kv_cache_memory"] = args.kv_cache_memory
    return EngineConfig(**kw)


def build_engine(model, dtype="auto", device=None, routers: str | None = None,
                 engine_config: EngineConfig | None = None, sparsity=None) -> LLMEngine:
    """An LLMEngine, sparse when ``routers`` names a bundle (``sparsity``: a SparsityConfig
    overriding the bundle's defaults). ``model``: folder, None (embedded default), or a CausalLM."""
    return LLMEngine(model, dtype=dtype, device=device, engine_config=engine_config, routers=routers, sparsity=sparsity)


def sparsity_label(engine: LLMEngine) -> str:
    """What a decode step of ``engine`` runs, in words (reported by /v1/models and benchmarks)."""
    setup = getattr(engine, "sparse_setup", None)
    if setup is None and engine.runner.planner_factory is None:
        return "dense"
    return setup.describe() if setup is not None and setup.factory is engine.runner.planner_factory else "sparse"


def make_app(engine: LLMEngine, names: list[str], sparsity: str, api_key: str | None = None):
    """A started AsyncEngine and the FastAPI app around it (stop with ``app.state.server.aengine.shutdown()``)."""
    from polarsparse.serve.app import ServerState, build_app

    metrics = ServingMetrics(engine)
    aengine = AsyncEngine(engine, on_step=metrics.on_step).start()
    return build_app(ServerState(aengine, metrics, names, sparsity, api_key))


def served_names(engine: LLMEngine, model_arg, served_model_name: str | None) -> list[str]:
    names = [served_model_name] if served_model_name else []
    names.append(engine.model_path.name)
    if isinstance(model_arg, str) and model_arg not in names:
        names.append(model_arg)
    return names


# -- in-process server (tests, benchmark) -------------------------------------------------------
class ServerThread:
    """uvicorn serving ``app`` on a loopback port in a daemon thread. Use as a context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0):
        import uvicorn

        self.app = app
        self.sock = _bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="polarsparse-http", daemon=True)
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.app.state.server.aengine.shutdown()
        self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("POLARSPARSE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $POLARSPARSE_API_KEY; none)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the model folder name)")


def run(args) -> int:
    import uvicorn

    sock = _bind(args.host, args.port)
    from polarsparse.cli import routers_from_args

    routers, sparsity = routers_from_args(args)
    engine = build_engine(args.model, args.dtype, args.device, routers, engine_config_from_args(args), sparsity)
    label = sparsity_label(engine)
    app = make_app(engine, served_names(engine, args.model, args.served_model_name), label, args.api_key)
    print(f"serving {engine.model_path.name} ({label}) on http://{args.host}:{args.port}", file=sys.stderr)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        app.state.server.aengine.shutdown()
        sock.close()
    return 0
