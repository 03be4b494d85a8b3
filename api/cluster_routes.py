"""Cluster REST endpoints, `/metrics`, and what `potluck serve` mounts beside the OpenAI routes.

Parts:
- `cluster_router(engine)`: `GET /cluster` (model, plan: ranges + pipelines + predictions, every
  worker with its measured profile and live load), `GET /cluster/nodes/{node_id}`,
  `POST /cluster/nodes/{node_id}/drain` (finish in-flight work, route nothing new, then release
  its layers; 409 if it would leave no worker serving, unless `?force=true`),
  `POST /cluster/replan`, `POST /cluster/links/probe` (every worker measures its links again;
  the reports update `links` in `/cluster` and re-plan when a link changed), `GET /cluster/requests`
  (in flight: route, tokens so far).
  Unknown node ids are 404 in OpenAI's error envelope; bad input is 4xx with a message.
- `metrics_router(engine)`: `GET /metrics`, the engine's own registry in Prometheus' text format.
- `PUBLIC_PATHS`: open without the API key: `/health`, `/metrics` (as vLLM leaves it, so a
  Prometheus scraper needs no secret) and the dashboard's HTML (`/dashboard`; the page itself
  asks for the key before it reads `/cluster`). Everything under `/cluster` needs the key.
- `extra_routers(engine)`: the routers above plus the dashboard, for `create_app(routers=...)`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.contract import error_response

PUBLIC_PATHS: tuple[str, ...] = ("/health", "/metrics", "/dashboard")
NODE_ID = Path(description="A worker id, as listed by GET /cluster.", min_length=1, max_length=200)


def _unknown_node(node_id: str) -> JSONResponse:
    return error_response(404, f"no worker with id {node_id!r} is registered (see GET /cluster)",
                          "invalid_request_error", "node_id", "node_not_found")


def _plan_summary(engine: Any) -> dict[str, Any]:
    snapshot = engine.cluster_snapshot()
    return {"epoch": snapshot["epoch"], "plan": snapshot["plan"]}


def cluster_router(engine: Any) -> APIRouter:
    """The `/cluster` endpoints. Handlers are `async def`: they read the engine on its own loop."""
    router = APIRouter(tags=["cluster"])

    @router.get("/cluster", summary="Devices with their profiles, the placement and each stage's live load")
    async def get_cluster() -> dict[str, Any]:
        return engine.cluster_snapshot()

    @router.get("/cluster/nodes/{node_id}", summary="One worker: device, profile, layers, live load")
    async def get_node(node_id: str = NODE_ID) -> Response:
        try:
            return JSONResponse(engine.worker_snapshot(node_id))
        except KeyError:
            return _unknown_node(node_id)

    @router.post("/cluster/nodes/{node_id}/drain", summary="Finish the node's in-flight work, take no new, release its layers")
    async def drain_node(node_id: str = NODE_ID,
                         force: bool = Query(False, description="drain even if no other worker would serve the model")) -> Response:
        workers = engine.cluster.workers
        if node_id not in workers:
            return _unknown_node(node_id)
        others = [w for wid, w in workers.items() if wid != node_id and not w.draining]
        if not others and not workers[node_id].draining and not force:
            return error_response(409, f"draining {node_id!r} would leave no worker serving the model; "
                                  "add ?force=true to drain it anyway", "invalid_request_error", "node_id", "last_worker")
        engine.drain(node_id)
        return JSONResponse({"id": node_id, "draining": True, "node": engine.worker_snapshot(node_id)}, status_code=202)

    @router.post("/cluster/replan", summary="Plan layers again for the registered workers")
    async def replan() -> Response:
        if not engine.cluster.workers:
            return error_response(409, "no workers are registered; nothing to plan", "invalid_request_error", None, "no_workers")
        engine.replan()
        return JSONResponse(_plan_summary(engine))

    @router.post("/cluster/links/probe", summary="Have the workers measure their links again")
    async def probe_links() -> Response:
        return JSONResponse({"asked_workers": engine.probe_links()}, status_code=202)

    @router.get("/cluster/requests", summary="Requests in flight: route and tokens so far")
    async def get_requests() -> dict[str, Any]:
        data = engine.requests_snapshot()
        return {"object": "list", "data": data}

    return router


def metrics_router(engine: Any) -> APIRouter:
    """`GET /metrics` from the engine's own registry (scheduler/metrics.py)."""
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def extra_routers(engine: Any) -> list[APIRouter]:
    """Everything `potluck serve` mounts beside the OpenAI routes."""
    from api.dashboard import dashboard_router

    return [cluster_router(engine), metrics_router(engine), dashboard_router()]
