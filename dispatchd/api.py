"""The SO and FSP HTTP API (JSON; OpenAPI at ``/openapi.json``, browsable at ``/docs``).

Annotations here are evaluated eagerly (no ``from __future__ import annotations``): FastAPI
resolves the dependencies named inside them, which are local to :func:`create_app`.

Every error has one shape: ``{"error": "...", "problems": [{"field", "reason",
"overridable"}]}``, listing every problem found rather than the first.
"""


import datetime as dt
import html
import inspect
import json
import time
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dispatchd.core.engine import InstructionView
from dispatchd.core.instruction import (
    Ack,
    AmendRequest,
    CancelRequest,
    Instruction,
    InstructionRequest,
)
from dispatchd.core.validation import Problem
from dispatchd.openadr_api import add_openadr
from dispatchd.service import Caller, Refusal, Service

_TITLES = {
    401: "not authenticated", 403: "not allowed", 404: "not found", 405: "method not allowed",
    409: "conflict",
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
    """Sends by the running dispatchd. Sends are not journaled: this counts from 0 again
    after a restart, and reads 0 for an instruction read back from the journal."""
    delivery_failed: dict[str, str]
    """Channels that gave up on this revision for good, with the reason."""
    escalated: bool
    """Whether its expiry was escalated."""
    relay_answer: str | None = None
    """For a relayed instruction: what its platform was told of the FSP's answer (e.g.
    a UFTP FlexOrderResponse ``Accepted``), once told."""
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


class RelayOutcome(BaseModel):
    """What became of one dispatch of a relayed message."""

    external_id: str
    id: str | None = None
    """Our instruction id for it (``platform:external id``)."""
    status: str
    """``relayed`` (journaled and delivered), ``repeat`` (the same dispatch again),
    ``held`` (its FSP is not mapped: kept, alarmed, relayed once mapped), ``withdrawn`` (a
    held dispatch cancelled before delivery) or ``refused`` (see ``reason``)."""
    fsp: str | None = None
    state: str | None = None
    unreconciled: list[str] | None = None
    """What the mapping still lacks; settlement waits until it is reconciled."""
    reason: str | None = None
    revision: int | None = None
    status_url: str | None = None


class RelayOut(BaseModel):
    dispatches: list[RelayOutcome]


class MappingIn(BaseModel):
    ours: str = Field(min_length=1, max_length=128)
    """Our id (an FSP, contract or asset in the contracts file)."""


class MappingOut(BaseModel):
    kind: str
    external: str
    ours: str


class MappingsOut(BaseModel):
    platform: str
    mappings: list[MappingOut]
    released: list[dict[str, Any]] = []
    """Held dispatches relayed because of this change."""


class HeldOut(BaseModel):
    key: str
    platform: str
    external_id: str
    reason: str
    at: dt.datetime
    dispatch: dict[str, Any]


class ExceptionsOut(BaseModel):
    held: list[HeldOut]
    unreconciled: list[InstructionOut]


class ReconcileIn(BaseModel):
    contract_id: str = Field(min_length=1, max_length=128)
    assets: list[str] = []
    """The contract's assets the instruction is for; empty: all of them."""


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

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """The framework's own refusals, in the API's error shape: a body that is not JSON
        is a 422 like any other invalid body; a wrong method lists every allowed one."""
        if exc.status_code == 400:
            service.metrics.refused.labels(request.url.path.split("/")[-1], "422").inc()
            return _error(422, (Problem("body", "the body is not valid JSON"),))
        if exc.status_code == 405:
            allowed = sorted({m for route in app.routes
                              if isinstance(route, APIRoute)
                              and route.path_regex.match(request.url.path)
                              for m in route.methods})
            response = JSONResponse(
                {"error": "method not allowed", "problems": [{
                    "field": "method", "reason": f"{request.method} is not allowed here; "
                    f"use {', '.join(allowed)}", "overridable": False}]},
                status_code=405, headers={"Allow": ", ".join(allowed)})
            return response
        return _error(exc.status_code, (Problem("path", str(exc.detail)),))

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

    # ------------------------------------------------------------------ relay intake

    async def platform(who: Annotated[Caller, Depends(caller)]) -> Caller:
        if who.role != "platform":
            raise Refusal(403, (Problem("authorization", "only a relaying platform may do "
                                        "this"),))
        return who

    @app.post("/v1/relay/{platform_name}/dispatches", status_code=202,
              responses=_ok(202, "what became of each dispatch", RelayOut),
              summary="Relay a platform's dispatch message, in the platform's own shape",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {}}}}})
    async def relay(platform_name: str, request: Request,
                    who: Annotated[Caller, Depends(platform)]) -> Response:
        """Delivered first, reconciled later: a dispatch whose FSP is known goes out at
        once, even when its contract or assets are not mapped yet; one whose FSP is not
        known is held and alarmed until the mapping is added."""
        if who.id != platform_name:
            raise Refusal(404, (Problem("platform", f"no relay platform {platform_name!r} "
                                        f"for {who.id}"),))
        outcomes = await service.relay(platform_name, await request.body(),
                                       request.headers.get("content-type", ""))
        if outcomes and all(o["status"] == "refused" for o in outcomes):
            raise Refusal(422, tuple(Problem(o["external_id"], o["reason"]) for o in outcomes))
        return _json({"dispatches": outcomes}, 202)

    def mappings_body(platform_name: str, released: list[dict[str, Any]]) -> Response:
        return _json({"platform": platform_name, "released": released, "mappings": [
            {"kind": k, "external": e, "ours": o}
            for k, e, o in service.engine.mappings(platform_name)]})

    def own_platform(so_id: str, platform_name: str) -> None:
        found = service.config.relay.platforms.get(platform_name)
        if found is None or found.so != so_id:
            raise Refusal(404, (Problem("platform", f"no relay platform {platform_name!r} "
                                        f"for {so_id}"),))

    @app.get("/v1/relay/{platform_name}/mappings", responses=_ok(200, "the mappings",
                                                                  MappingsOut),
             summary="A platform's mapping table: its ids to ours (SO)")
    async def get_mappings(platform_name: str, who: Annotated[Caller, Depends(so)]
                           ) -> Response:
        own_platform(who.id, platform_name)
        return mappings_body(platform_name, [])

    @app.put("/v1/relay/{platform_name}/mappings/{kind}/{external}",
             responses=_ok(200, "the mappings, and the held dispatches now relayed",
                           MappingsOut),
             summary="Map one of a platform's ids to ours; held dispatches go out (SO)")
    async def put_mapping(platform_name: str, kind: str, external: str, body: MappingIn,
                          who: Annotated[Caller, Depends(so)]) -> Response:
        own_platform(who.id, platform_name)
        released = await service.set_mapping(who.id, platform_name, kind, external, body.ours)
        return mappings_body(platform_name, released)

    @app.delete("/v1/relay/{platform_name}/mappings/{kind}/{external}",
                responses=_ok(200, "the mappings", MappingsOut),
                summary="Remove a mapping (SO)")
    async def delete_mapping(platform_name: str, kind: str, external: str,
                             who: Annotated[Caller, Depends(so)]) -> Response:
        own_platform(who.id, platform_name)
        released = await service.set_mapping(who.id, platform_name, kind, external, None)
        return mappings_body(platform_name, released)

    @app.get("/v1/relay/exceptions", responses=_ok(200, "held and unreconciled",
                                                    ExceptionsOut),
             summary="Relayed dispatches held for want of an FSP mapping, and relayed "
             "instructions not yet reconciled (SO)")
    async def exceptions(who: Annotated[Caller, Depends(so)]) -> Response:
        held = [{"key": h.key, "platform": h.platform, "external_id": h.external_id,
                 "reason": h.reason, "at": h.at.isoformat(), "dispatch": h.dispatch}
                for h in service.engine.held(who.id)]
        unreconciled = [v.as_json() for v in service.engine.unreconciled_views("so", who.id)]
        return _json({"held": held, "unreconciled": unreconciled})

    @app.post("/v1/instructions/{instruction_id}/reconcile",
              responses=_ok(200, "the instruction, attached to its contract"),
              summary="Attach a relayed instruction to its contract and assets (SO)")
    async def reconcile(instruction_id: str, body: ReconcileIn,
                        who: Annotated[Caller, Depends(so)]) -> Response:
        view, created = await service.reconcile(who.id, instruction_id, body.contract_id,
                                                tuple(body.assets))
        return answer(view, created, status=200)

    add_openadr(app, service)

    # ------------------------------------------------------------------ UFTP

    @app.post("/shapeshifter/api/v3/message", include_in_schema=False)
    async def uftp_message(request: Request) -> Response:
        """The UFTP (Shapeshifter 3.x) AGR endpoint: signed XML from DSO platforms."""
        status, reason = await service.uftp(await request.body(),
                                            request.headers.get("content-type", ""))
        return Response(reason, status, media_type="text/plain")

    # ------------------------------------------------------------------ streams

    async def open_stream(ws: WebSocket, role: str, since: int) -> None:
        header = ws.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        who = service.authenticate(token if scheme.lower() == "bearer" else None)
        if who is None:
            await ws.send_denial_response(_error(401, (
                Problem("authorization", "a valid bearer token is needed"),)))
            return
        if who.role != role:
            other = "/v1/stream" if who.role == "fsp" else "/v1/so/stream"
            await ws.send_denial_response(_error(403, (
                Problem("authorization", f"this stream is for {role} tokens; use {other}"),)))
            return
        latest = service.engine.feed_length(role, who.id)
        if since > latest:
            await ws.send_denial_response(_error(409, (Problem(
                "since", f"{since} is beyond the newest event of this stream ({latest})"),)))
            return
        await ws.accept()
        await service.streams.serve(
            ws, role=role, principal=who.id, since=since,
            first=lambda: service.engine.feed_first(role, who.id),
            length=lambda: service.engine.feed_length(role, who.id),
            event=lambda n: service.engine.feed_event(role, who.id, n),
            reply=(lambda text: service.stream_ack(who.id, text)) if role == "fsp" else None,
            sent=service.stream_sent if role == "fsp" else None,
        )

    @app.websocket("/v1/stream")
    async def fsp_stream(ws: WebSocket, since: Annotated[int, Query(ge=0)] = 0) -> None:
        """An FSP's events (instructions, amendments, cancellations, expiries, its own
        acknowledgements), numbered per FSP; acknowledgements may be sent back as frames."""
        await open_stream(ws, "fsp", since)

    @app.websocket("/v1/so/stream")
    async def so_stream(ws: WebSocket, since: Annotated[int, Query(ge=0)] = 0) -> None:
        """Every state change of an SO's instructions, numbered per SO."""
        await open_stream(ws, "so", since)

    # ------------------------------------------------------------------ email links

    def link_page(title: str, body: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body style='font-family:sans-serif;max-width:40em'>"
            f"<h1>{html.escape(title)}</h1>{body}</body></html>", status)

    def linked(instruction_id: str, revision: int, fsp_id: str, sig: str) -> Instruction | None:
        if not service.links.valid(fsp_id, instruction_id, revision, sig):
            return None
        return service.instruction_for_link(fsp_id, instruction_id, revision)

    @app.get("/v1/respond/{instruction_id}/{revision}", include_in_schema=False)
    async def respond_page(instruction_id: str, revision: int, fsp: str = "", sig: str = ""
                           ) -> HTMLResponse:
        """The page an email's acknowledge link opens: it asks, it changes nothing."""
        inst = linked(instruction_id, revision, fsp, sig)
        if inst is None:
            return link_page("Link not valid", "<p>This acknowledge link is not valid.</p>", 404)
        state = service.engine.view(instruction_id)
        assert state is not None
        answered = state.revisions[revision].ack
        summary = (f"<p>{html.escape(inst.kind.value)} {html.escape(inst.id)} revision "
                   f"{revision}: {html.escape(inst.direction.value)} {inst.capacity_mw:g} MW "
                   f"from {inst.start.isoformat()} to {inst.end.isoformat()}.</p>")
        if answered is not None:
            return link_page("Already answered", summary + f"<p>Answered "
                             f"{html.escape(answered.response.value)} at "
                             f"{answered.at.isoformat()}.</p>")
        return link_page("Acknowledge instruction", summary + (
            "<form method='post'><p><label>Reason (needed to reject): "
            "<input name='reason' size='40'></label></p>"
            "<button name='response' value='accepted'>Accept</button> "
            "<button name='response' value='rejected'>Reject</button></form>"))

    @app.post("/v1/respond/{instruction_id}/{revision}", include_in_schema=False)
    async def respond(request: Request, instruction_id: str, revision: int, fsp: str = "",
                      sig: str = "") -> HTMLResponse:
        if linked(instruction_id, revision, fsp, sig) is None:
            return link_page("Link not valid", "<p>This acknowledge link is not valid.</p>", 404)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        response = form.get("response", [""])[0]
        reason = form.get("reason", [""])[0].strip()
        try:
            view, _ = await service.respond_by_link(fsp, instruction_id, revision, response,
                                                    reason)
        except ValidationError as exc:
            return link_page("Not recorded", "".join(
                f"<p>{html.escape(str(e['msg']))}</p>" for e in exc.errors()), 422)
        except Refusal as refusal:
            return link_page("Not recorded", "".join(
                f"<p>{html.escape(p.reason)}</p>" for p in refusal.problems), refusal.status)
        return link_page("Recorded", f"<p>Your answer ({html.escape(response)}) to "
                         f"{html.escape(instruction_id)} revision {revision} is recorded; the "
                         f"instruction is now {html.escape(view.state.value)}.</p>")

    @app.get("/healthz", summary="Liveness and readiness")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "mqtt_connected": service.mqtt.connected.is_set(),
            "instructions": len(service.engine),
            "journal_queue": service.journal.depth,
            "stream_clients": {"fsp": service.streams.connected("fsp"),
                               "so": service.streams.connected("so")},
            "email_queue": service.email.depth,
            "webhook_queue": service.webhook.depth,
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    timed = _Timed(app, service)
    return timed
