"""The FastAPI application: OpenAI-compatible routes, health, Prometheus metrics, API key.

    /v1/completions, /v1/chat/completions   (POST; stream with SSE when "stream": true)
    /v1/models                              (GET)
    /health, /metrics                       (GET; never need the API key)

Every error is JSON in OpenAI's shape; 4xx means the request was refused and nothing was queued.
"""
from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from polarsparse import __version__
from polarsparse.serve.async_engine import AsyncEngine
from polarsparse.serve.errors import APIError, model_not_found, not_found, server_error, unauthorized
from polarsparse.serve.generation import GenerationRun
from polarsparse.serve.inputs import chat_input, completion_input, parse_body
from polarsparse.serve.metrics import ServingMetrics
from polarsparse.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's convention; nobody reads it, but logs and metrics do


@dataclass
class ServerState:
    aengine: AsyncEngine
    metrics: ServingMetrics
    model_names: list[str]  # the first is the id /v1/models reports; any of them is accepted
    sparsity: str  # "dense" or a description of the router bundle
    api_key: str | None = None


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="polarsparse", version=__version__, docs_url=None, redoc_url=None)
    app.state.server = state
    _add_error_handlers(app)

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
            raise unauthorized()

    @app.get("/health")
    async def health() -> Response:
        if state.aengine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse(server_error("the engine is not running", 503).body(), status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> Response:
        card = ModelCard(id=state.model_names[0], max_model_len=state.aengine.engine.max_model_len, sparsity=state.sparsity)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Response:
        return await _generate(state, request, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, chat=True)

    return app


async def _generate(state: ServerState, request: Request, chat: bool) -> Response:
    engine = state.aengine.engine
    try:
        req = parse_body(ChatCompletionRequest if chat else CompletionRequest, await request.body())
        if req.model not in state.model_names:
            raise model_not_found(req.model, state.model_names[:1])
        inp = chat_input(req, engine) if chat else completion_input(req, engine)
        if not state.aengine.healthy:
            raise server_error("the engine is not running", 503)
    except APIError:
        state.metrics.requests.labels("chat" if chat else "completions", "rejected").inc()
        raise
    run = GenerationRun(state.aengine, state.metrics, inp, chat, state.model_names[0])
    if inp.stream:
        return StreamingResponse(run.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    response = await run.respond(request)
    if response is None:
        return Response(status_code=CLIENT_CLOSED)
    return Response(response.model_dump_json(), media_type="application/json")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err = not_found(request.url.path) if exc.status_code == 404 else APIError(str(exc.detail), exc.status_code)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        log.exception("internal error")
        return JSONResponse(server_error(f"internal error: {type(exc).__name__}").body(), status_code=500)
