"""The SO and FSP HTTP API (JSON; OpenAPI at ``/openapi.json``, browsable at ``/docs``).

Annotations here are evaluated eagerly (no ``from __future__ import annotations``): FastAPI
resolves the dependencies named inside them, which are local to :func:`create_app`.

Every error has one shape: ``{"error": "...", "problems": [{"field", "reason",
"overridable"}]}``, listing every problem found rather than the first.
"""


import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from dispatchd.core.engine import InstructionView
from dispatchd.core.instruction import Ack, AmendRequest, CancelRequest, InstructionRequest
from dispatchd.core.validation import Problem
from dispatchd.service import Caller, Refusal, Service

_TITLES = {
    401: "not authenticated", 403: "not allowed", 404: "not found", 409: "conflict",
    422: "invalid request", 503: "temporarily unavailable",
}


class ProblemBody(BaseModel):
    field: str
    reason: str
    overridable: bool = False


class ErrorBody(BaseModel):
    error: str
    problems: list[ProblemBody]


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": title} for code, title in _TITLES.items()
}


def _error(status: int, problems: tuple[Problem, ...], *, retry_after: int | None = None
           ) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        {"error": _TITLES.get(status, "error"), "problems": [p.as_json() for p in problems]},
        status_code=status, headers=headers,
    )


def _endpoint(method: str, path: str) -> str:
    """A small, fixed set of labels for the latency histogram."""
    if method == "POST" and path == "/v1/instructions":
        return "submit"
    if method == "POST" and path.startswith("/v1/instructions/"):
        return path.rsplit("/", 1)[-1] if path.count("/") == 4 else "other"
    return "read" if path.startswith("/v1/") else "other"


class _Timed:
    """ASGI wrapper observing every request's time to answer in ``flexops_accept_seconds``."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.histogram = service.metrics.accept_seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.histogram.labels(_endpoint(scope["method"], scope["path"])).observe(
                time.perf_counter() - started)


def create_app(service: Service) -> Any:
    """The ASGI application serving ``service`` (FastAPI inside a timing wrapper)."""
    app = FastAPI(
        title="flexops dispatchd",
        version="1",
        description="Dispatch instructions from system operators to flexibility service "
        "providers: accepted only once journaled, delivered until acknowledged.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    bearer = HTTPBearer(auto_error=False)

    @app.exception_handler(Refusal)
    async def _refused(request: Request, exc: Refusal) -> JSONResponse:
        service.metrics.refused.labels(request.url.path.split("/")[-1], str(exc.status)).inc()
        return _error(exc.status, exc.problems, retry_after=exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        service.metrics.refused.labels(request.url.path.split("/")[-1], "422").inc()
        problems = tuple(
            Problem(".".join(str(p) for p in e["loc"] if p != "body") or "body", e["msg"])
            for e in exc.errors()
        )
        return _error(422, problems)

    def caller(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Caller:
        found = service.authenticate(creds.credentials if creds else None)
        if found is None:
            raise Refusal(401, (Problem("authorization", "a valid bearer token is needed"),))
        return found

    def so(who: Annotated[Caller, Depends(caller)]) -> Caller:
        if who.role != "so":
            raise Refusal(403, (Problem("authorization", "only a system operator may do this"),))
        return who

    def fsp(who: Annotated[Caller, Depends(caller)]) -> Caller:
        if who.role != "fsp":
            raise Refusal(403, (Problem("authorization", "only an FSP may do this"),))
        return who

    def answer(view: InstructionView, created: bool, response: Response) -> dict[str, Any]:
        url = f"{service.base_url}/v1/instructions/{view.id}"
        response.status_code = 202 if created else 200
        response.headers["Location"] = url
        return {"status_url": url, "created": created, **view.as_json()}

    @app.post("/v1/instructions", status_code=202, responses=_ERRORS,
              summary="Issue an instruction (SO)")
    async def create(req: InstructionRequest, response: Response,
                     who: Annotated[Caller, Depends(so)]) -> dict[str, Any]:
        """202 once journaled (200 for an identical repeat of the same id); 409 names the
        fields that differ from the stored instruction; 422 lists every problem."""
        return answer(*await service.submit(who.id, req), response)

    @app.get("/v1/instructions/{instruction_id}", responses=_ERRORS,
             summary="One instruction with all its revisions")
    async def get(instruction_id: str, who: Annotated[Caller, Depends(caller)]
                  ) -> dict[str, Any]:
        view = service.engine.visible(instruction_id, who.role, who.id)
        if view is None:
            raise Refusal(404, (Problem("id", f"no instruction {instruction_id!r} for {who.id}"),))
        return {"status_url": f"{service.base_url}/v1/instructions/{view.id}",
                **view.as_json()}

    @app.get("/v1/instructions", responses=_ERRORS,
             summary="Instructions changed since a cursor, oldest change first")
    async def changes(
        who: Annotated[Caller, Depends(caller)],
        since: Annotated[int, Query(ge=0, description="cursor from the previous page")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        views, cursor = service.engine.changed_since(who.role, who.id, since, limit)
        return {"instructions": [v.as_json() for v in views], "cursor": cursor}

    @app.post("/v1/instructions/{instruction_id}/amend", status_code=202, responses=_ERRORS,
              summary="Amend an instruction: a new revision (SO)")
    async def amend(instruction_id: str, req: AmendRequest, response: Response,
                    who: Annotated[Caller, Depends(so)]) -> dict[str, Any]:
        return answer(*await service.amend(who.id, instruction_id, req), response)

    @app.post("/v1/instructions/{instruction_id}/cancel", status_code=202, responses=_ERRORS,
              summary="Cancel an instruction: a new revision the FSP acknowledges (SO)")
    async def cancel(instruction_id: str, req: CancelRequest, response: Response,
                     who: Annotated[Caller, Depends(so)]) -> dict[str, Any]:
        return answer(*await service.cancel(who.id, instruction_id, req), response)

    @app.post("/v1/instructions/{instruction_id}/ack", responses=_ERRORS,
              summary="Accept or reject a revision (FSP)")
    async def ack(instruction_id: str, body: Ack, response: Response,
                  who: Annotated[Caller, Depends(fsp)]) -> dict[str, Any]:
        view, created = await service.acknowledge(who.id, instruction_id, body)
        result = answer(view, created, response)
        response.status_code = 200
        return result

    @app.get("/healthz", summary="Liveness and readiness")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "mqtt_connected": service.mqtt.connected.is_set(),
            "instructions": len(service.engine),
            "journal_queue": service.journal.depth,
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    timed = _Timed(app, service)
    return timed
