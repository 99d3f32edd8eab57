"""The HTTP API on aiohttp: routes, JSON errors, and metrics around every request.

    POST   /v1/predict          {"prompt", "inputs", "max_decode_length"?, "temperature"?,
                                 "num_beams"?} -> {"predictions", "truncated", ...}
    POST   /v1/score            {"prompt", "inputs", "candidates"} -> {"scores", "predictions"}
    GET    /v1/prompts          -> {"prompts": [{"name", "length"}], "capacity", "max_length"}
    POST   /v1/prompts          {"name", "path" | "prompt"}: add or replace, no restart
    DELETE /v1/prompts/{name}
    GET    /healthz, GET /metrics (Prometheus text format)

Every error is a JSON object `{"error": ..., "field"?: ...}` with its status: 400 for a
malformed body or a wrong field, 403 for a prompt `path` outside SERVE_PROMPT_DIR (or any
path when it is unset), 404 for an unknown prompt or route, 409 for a full bank, 413 for a
request over the size limits, 503 with `Retry-After` when SERVE_MAX_QUEUED_ROWS rows are
queued, 500 for a bug (logged; the server goes on).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from aiohttp import web

from softprompt_jax.checkpoints.prompt_files import load_prompt
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.serving import requests
from softprompt_jax.serving.batcher import Batcher, QueueFull
from softprompt_jax.serving.engine import PromptGone
from softprompt_jax.serving.metrics import CONTENT_TYPE, ServeMetrics
from softprompt_jax.serving.registry import BankFull, PromptRegistry
from softprompt_jax.serving.requests import RequestError

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1  # a full queue drains within a few batches
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass
class Service:
    """What the handlers use: the prompts, the batcher, the request checks and the metrics."""

    registry: PromptRegistry
    batcher: Batcher
    parser: requests.Parser
    metrics: ServeMetrics
    programs: int  # compiled at warm-up
    max_request_bytes: int  # a longer body gets 413
    prompt_dir: str | None = None  # POST /v1/prompts reads paths only inside it (None: none)


def make_app(service: Service) -> web.Application:
    """The aiohttp application serving `service`."""
    api = _Api(service)
    app = web.Application(
        client_max_size=service.max_request_bytes,
        middlewares=[_errors_and_metrics(service.metrics)],
    )
    app.router.add_post("/v1/predict", api.predict)
    app.router.add_post("/v1/score", api.score)
    app.router.add_get("/v1/prompts", api.list_prompts)
    app.router.add_post("/v1/prompts", api.put_prompt)
    app.router.add_delete("/v1/prompts/{name}", api.delete_prompt)
    app.router.add_get("/healthz", api.health)
    app.router.add_get("/metrics", api.metrics)
    return app


def _errors_and_metrics(metrics: ServeMetrics):
    """Answer every error as JSON (status and field), and count and time every request."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.resource
        endpoint = "unknown" if route is None else route.canonical
        try:
            response = await handler(request)
        except RequestError as error:
            response = web.json_response(error.body(), status=error.status)
        except QueueFull as error:
            metrics.queue_full.labels(endpoint).inc()
            response = web.json_response(
                {"error": str(error)},
                status=503,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        except web.HTTPException as error:  # aiohttp's own: no route, wrong method, too large
            message = error.reason if error.status != 413 else error.text
            response = web.json_response({"error": message}, status=error.status)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = web.json_response(
                {"error": "internal error (logged by the server)"}, status=500
            )
        metrics.observe_request(endpoint, response.status, time.perf_counter() - started)
        return response

    return middleware


class _Api:
    def __init__(self, service: Service) -> None:
        self.service = service

    async def predict(self, request: web.Request) -> web.Response:
        rows = self.service.parser.predict(await request.read(), self.service.registry.lengths())
        results = await self.service.batcher.submit(rows.works)
        return _answer(rows.truncated, {"predictions": _checked(results)})

    async def score(self, request: web.Request) -> web.Response:
        rows = self.service.parser.score(await request.read(), self.service.registry.lengths())
        flat = _checked(await self.service.batcher.submit(rows.works))
        counts = np.cumsum([len(each) for each in rows.candidates])[:-1]
        scores = np.split(np.asarray(flat, np.float64), counts)
        # The best candidate, the earliest among equals, as `infer` ranks them.
        best = [c[int(np.argmax(s))] for c, s in zip(rows.candidates, scores, strict=True)]
        return _answer(
            rows.truncated, {"scores": [s.tolist() for s in scores], "predictions": best}
        )

    async def list_prompts(self, request: web.Request) -> web.Response:
        registry = self.service.registry
        prompts = [{"name": n, "length": k} for n, k in registry.lengths().items()]
        return web.json_response(
            {"prompts": prompts, "capacity": registry.capacity, "max_length": registry.max_length}
        )

    async def put_prompt(self, request: web.Request) -> web.Response:
        name, path, array = requests.prompt_update(await request.read())
        if path is not None:
            real = allowed_path(path, self.service.prompt_dir)
            try:
                array = await asyncio.to_thread(load_prompt, real)
            except SoftpromptError as error:  # naming the client's path, not the real one
                raise RequestError(400, str(error).replace(real, path), "path") from error
            if isinstance(array, Mapping):
                raise RequestError(
                    400,
                    f"{path} holds a prefix (key/value per layer); the server serves soft "
                    "prompts [length, emb_dim] (.npy, PEFT PROMPT_TUNING dir, official file)",
                    "path",
                )
        try:
            replaced = self.service.registry.put(name, np.asarray(array))
        except BankFull as error:
            raise RequestError(409, str(error), "name") from error
        except SoftpromptError as error:
            raise RequestError(400, str(error), "path" if path is not None else "prompt") from error
        body = {"name": name, "length": int(array.shape[0]), "replaced": replaced}
        return web.json_response(body, status=200 if replaced else 201)

    async def delete_prompt(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            self.service.registry.delete(name)
        except KeyError:
            raise RequestError(404, f"no prompt named {name!r}", "name") from None
        return web.json_response({"deleted": name})

    async def health(self, request: web.Request) -> web.Response:
        registry = self.service.registry
        return web.json_response(
            {"status": "ok", "prompts": len(registry.lengths()), "programs": self.service.programs}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.service.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response


def allowed_path(path: str, prompt_dir: str | None) -> str:
    """`path` (relative to `prompt_dir`, or absolute) as a real path inside `prompt_dir`;
    403 naming "path" if it is unset or the path (after `..` and symlinks) leaves it."""
    if prompt_dir is None:
        raise RequestError(
            403,
            "this server reads no prompt files (SERVE_PROMPT_DIR is unset); send the "
            'array as "prompt"',
            "path",
        )
    root = os.path.realpath(prompt_dir)
    real = os.path.realpath(os.path.join(root, path))
    if "://" in path or os.path.commonpath([root, real]) != root:
        raise RequestError(403, f"{path!r} is not inside SERVE_PROMPT_DIR", "path")
    return real


def _checked(results: list[Any]) -> list[Any]:
    """The rows' results; a row that failed fails its request (only its request)."""
    for result in results:
        if isinstance(result, PromptGone):
            raise RequestError(404, str(result), "prompt")
        if isinstance(result, BaseException):
            raise result
    return results


def _answer(truncated: list[bool], body: dict[str, Any]) -> web.Response:
    """The answer, saying whether inputs were cut to the largest compiled input length."""
    cut = [i for i, each in enumerate(truncated) if each]
    return web.json_response({**body, "truncated": bool(cut), "truncated_inputs": cut})
