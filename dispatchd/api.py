"""The SO and FSP HTTP API (JSON; OpenAPI at ``/openapi.json``, browsable at ``/docs``).

Annotations here are evaluated eagerly (no ``from __future__ import annotations``): FastAPI
resolves the dependencies named inside them, which are local to :func:`create_app`.

Every error has one shape: ``{"error": "...", "problems": [{"field", "reason",
"overridable"}]}``, listing every problem found rather than the first.
"""


import datetime as dt
import inspect
import json
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from dispatchd.core.engine import InstructionView
from dispatchd.core.instruction import (
    Ack,
    AmendRequest,
    CancelRequest,
    Instruction,
    InstructionRequest,
)
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


class AckOut(BaseModel):
    response: str
    reason: str | None
    at: dt.datetime
    late: bool


class RevisionOut(BaseModel):
    revision: int
    kind: str
    state: str
    accepted_at: dt.datetime
    delivered: dict[str, dt.datetime]
    """First hand-over per channel."""
    send_attempts: int
    ack: AckOut | None


class InstructionOut(BaseModel):
    """An instruction: its latest revision in full, and the history of every revision."""

    id: str
    revision: int
    state: str
    cursor: int
    instruction: Instruction
    revisions: list[RevisionOut]
    status_url: str | None = None
    created: bool | None = None
    """On create, amend, cancel and ack: false when the call repeated an earlier one."""


class PageOut(BaseModel):
    instructions: list[InstructionOut]
    cursor: int


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": title} for code, title in _TITLES.items()
}


def _ok(status: int, description: str, model: type[BaseModel] = InstructionOut
        ) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": model, "description": description}, **_ERRORS}


def _error(status: int, problems: tuple[Problem, ...], *, retry_after: int | None = None
           ) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        {"error": _TITLES.get(status, "error"), "problems": [p.as_json() for p in problems]},
        status_code=status, headers=headers,
    )


# Metrics are Prometheus (/metrics). FastAPI versions with native OpenTelemetry check for a
# provider on every request; switch that off where the option exists.
_NO_OTEL: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI).parameters else {}
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


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, headers,
                    media_type="application/json")


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
        **_NO_OTEL,
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

    # Dependencies are coroutines: FastAPI would run plain functions in a thread pool.
    async def caller(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Caller:
        found = service.authenticate(creds.credentials if creds else None)
        if found is None:
            raise Refusal(401, (Problem("authorization", "a valid bearer token is needed"),))
        return found

    async def so(who: Annotated[Caller, Depends(caller)]) -> Caller:
        if who.role != "so":
            raise Refusal(403, (Problem("authorization", "only a system operator may do this"),))
        return who

    async def fsp(who: Annotated[Caller, Depends(caller)]) -> Caller:
        if who.role != "fsp":
            raise Refusal(403, (Problem("authorization", "only an FSP may do this"),))
        return who

    def answer(view: InstructionView, created: bool, *, status: int | None = None) -> Response:
        """The instruction as JSON, serialised here rather than by FastAPI's encoder."""
        url = f"{service.base_url}/v1/instructions/{view.id}"
        return _json({"status_url": url, "created": created, **view.as_json()},
                     status or (202 if created else 200), {"Location": url})

    @app.post("/v1/instructions", status_code=202, summary="Issue an instruction (SO)",
              responses=_ok(202, "journaled") | {200: {"model": InstructionOut,
                                                        "description": "identical repeat"}})
    async def create(req: InstructionRequest,
                     who: Annotated[Caller, Depends(so)]) -> Response:
        """202 once journaled (200 for an identical repeat of the same id); 409 names the
        fields that differ from the stored instruction; 422 lists every problem."""
        return answer(*await service.submit(who.id, req))

    @app.get("/v1/instructions/{instruction_id}", responses=_ok(200, "the instruction"),
             summary="One instruction with all its revisions")
    async def get(instruction_id: str, who: Annotated[Caller, Depends(caller)]) -> Response:
        view = service.engine.visible(instruction_id, who.role, who.id)
        if view is None:
            raise Refusal(404, (Problem("id", f"no instruction {instruction_id!r} for {who.id}"),))
        return _json({"status_url": f"{service.base_url}/v1/instructions/{view.id}",
                      **view.as_json()})

    @app.get("/v1/instructions", responses=_ok(200, "a page of changes", PageOut),
             summary="Instructions changed since a cursor, oldest change first")
    async def changes(
        who: Annotated[Caller, Depends(caller)],
        since: Annotated[int, Query(ge=0, description="cursor from the previous page")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        views, cursor = service.engine.changed_since(who.role, who.id, since, limit)
        return _json({"instructions": [v.as_json() for v in views], "cursor": cursor})

    @app.post("/v1/instructions/{instruction_id}/amend", status_code=202,
              responses=_ok(202, "the new revision, journaled"),
              summary="Amend an instruction: a new revision (SO)")
    async def amend(instruction_id: str, req: AmendRequest,
                    who: Annotated[Caller, Depends(so)]) -> Response:
        return answer(*await service.amend(who.id, instruction_id, req))

    @app.post("/v1/instructions/{instruction_id}/cancel", status_code=202,
              responses=_ok(202, "the cancellation revision, journaled"),
              summary="Cancel an instruction: a new revision the FSP acknowledges (SO)")
    async def cancel(instruction_id: str, req: CancelRequest,
                     who: Annotated[Caller, Depends(so)]) -> Response:
        return answer(*await service.cancel(who.id, instruction_id, req))

    @app.post("/v1/instructions/{instruction_id}/ack", responses=_ok(200, "answer recorded"),
              summary="Accept or reject a revision (FSP)")
    async def ack(instruction_id: str, body: Ack,
                  who: Annotated[Caller, Depends(fsp)]) -> Response:
        view, created = await service.acknowledge(who.id, instruction_id, body)
        return answer(view, created, status=200)

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
