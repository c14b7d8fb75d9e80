"""The OpenADR 3.1 VTN routes (see :mod:`dispatchd.openadr` for what maps to what).

Errors here use OpenADR's problem shape: ``{"type", "title", "status", "detail"}``.
"""

from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from dispatchd.core.instruction import Ack
from dispatchd.openadr import (
    PREFIX,
    UNRECONCILED_PROGRAM,
    Client,
    ReportIn,
    ResourceIn,
    SubscriptionIn,
    VenIn,
    ack_of_report,
    basic_credentials,
    event,
    is_live,
    mqtt_topics,
    new_object,
    problem_of,
    program,
)
from dispatchd.service import Refusal, Service


class OadrProblem(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           409: "Conflict", 503: "Service Unavailable"}


def add_openadr(app: FastAPI, service: Service) -> None:
    """Mount the VTN under :data:`~dispatchd.openadr.PREFIX`."""
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    store = service.openadr_store
    tokens = service.openadr_tokens

    @app.exception_handler(OadrProblem)
    async def _problem(request: Request, exc: OadrProblem) -> JSONResponse:
        return JSONResponse({"type": "about:blank", "title": _TITLES.get(exc.status, "Error"),
                             "status": exc.status, "detail": exc.detail},
                            status_code=exc.status,
                            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401
                            else None)

    async def client(request: Request) -> Client:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = tokens.client(token if scheme.lower() == "bearer" else None)
        if found is None:
            raise OadrProblem(401, "a valid access token from /auth/token is needed")
        return found

    Who = Annotated[Client, Depends(client)]

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise OadrProblem(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise OadrProblem(400, "the body is not a JSON object")
        return data

    def checked(model: type[BaseModel], body: dict[str, Any]) -> None:
        try:
            model.model_validate(body)
        except ValidationError as exc:
            raise OadrProblem(400, problem_of(exc)) from None

    # ---------------------------------------------------------------- auth

    @router.get("/auth/server")
    async def auth_server() -> dict[str, Any]:
        return {"tokenURL": f"{service.base_url}{PREFIX}/auth/token"}

    @router.post("/auth/token")
    async def auth_token(request: Request) -> JSONResponse:
        # application/x-www-form-urlencoded (RFC 6749 §4.4.2), read by the standard library
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace"),
                                             keep_blank_values=True).items()}
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        pair = basic_credentials(request.headers.get("authorization", "")) or (
            str(form.get("client_id", "")), str(form.get("client_secret", "")))
        issued = tokens.issue(*pair)
        if issued is None:
            return JSONResponse({"error": "invalid_client"}, status_code=401,
                                headers={"WWW-Authenticate": "Basic"})
        token, ttl = issued
        return JSONResponse({"access_token": token, "token_type": "Bearer",
                             "expires_in": ttl}, headers={"Cache-Control": "no-store"})

    # ---------------------------------------------------------------- programs, events

    def programs_of(who: Client) -> list[dict[str, Any]]:
        created = service.openadr_started
        found = [program(c.id, service.book, created) for c in service.book.contracts.values()
                 if c.fsp == who.fsp]
        if any(v.latest.instruction.contract_id is None
               for v in service.engine.unreconciled_views("fsp", who.fsp)):
            found.append(program(UNRECONCILED_PROGRAM, service.book, created))
        return found

    @router.get("/programs")
    async def get_programs(who: Who, skip: int = 0, limit: int = 50) -> list[dict[str, Any]]:
        return programs_of(who)[skip:skip + limit]

    @router.get("/programs/{program_id}")
    async def get_program(program_id: str, who: Who) -> dict[str, Any]:
        for found in programs_of(who):
            if found["id"] == program_id:
                return found
        raise OadrProblem(404, f"no program {program_id}")

    @router.get("/events")
    async def get_events(who: Who, programID: str | None = None, skip: int = 0,
                         limit: int = 50) -> list[dict[str, Any]]:
        found = [event(v) for v in service.openadr_views(who.fsp) if is_live(v)]
        if programID is not None:
            found = [e for e in found if e["programID"] == programID]
        return found[skip:skip + limit]

    @router.get("/events/{event_id}")
    async def get_event(event_id: str, who: Who) -> dict[str, Any]:
        view = service.engine.visible(event_id, "fsp", who.fsp)
        if view is None or not is_live(view):
            raise OadrProblem(404, f"no event {event_id}")
        return event(view)

    # ---------------------------------------------------------------- vens, resources ...

    def owned(kind: str, who: Client, object_id: str) -> dict[str, Any]:
        found = store.get(kind, who.fsp, object_id)
        if found is None:
            raise OadrProblem(404, f"no {kind[:-1]} {object_id}")
        return found

    def listing(kind: str, who: Client, filters: dict[str, str | None], skip: int,
                limit: int) -> list[dict[str, Any]]:
        found = store.all(kind, who.fsp)
        for key, wanted in filters.items():
            if wanted is not None:
                found = [o for o in found if o.get(key) == wanted]
        return found[skip:skip + limit]

    def stored(kind: str, who: Client, body: dict[str, Any]) -> dict[str, Any]:
        created = new_object(kind, body, who, service.clock())
        store.put(kind, who.fsp, created)
        return created

    @router.get("/vens")
    async def get_vens(who: Who, venName: str | None = None, skip: int = 0,
                       limit: int = 50) -> list[dict[str, Any]]:
        return listing("vens", who, {"venName": venName}, skip, limit)

    @router.post("/vens", status_code=201)
    async def post_ven(who: Who, body: Annotated[dict[str, Any], Depends(body_of)]
                       ) -> dict[str, Any]:
        checked(VenIn, body)
        name = body["venName"]
        if any(v["venName"] == name for v in store.all("vens")):
            raise OadrProblem(409, f"a VEN named {name} exists")
        return stored("vens", who, body)

    @router.get("/resources")
    async def get_resources(who: Who, venID: str | None = None,
                            resourceName: str | None = None,
                            skip: int = 0, limit: int = 50) -> list[dict[str, Any]]:
        return listing("resources", who, {"venID": venID, "resourceName": resourceName},
                       skip, limit)

    @router.post("/resources", status_code=201)
    async def post_resource(who: Who, body: Annotated[dict[str, Any], Depends(body_of)]
                            ) -> dict[str, Any]:
        checked(ResourceIn, body)
        owned("vens", who, body["venID"])
        return stored("resources", who, body)

    @router.get("/subscriptions")
    async def get_subscriptions(who: Who, programID: str | None = None,
                                clientName: str | None = None,
                                skip: int = 0, limit: int = 50) -> list[dict[str, Any]]:
        return listing("subscriptions", who, {"programID": programID,
                                              "clientName": clientName}, skip, limit)

    @router.post("/subscriptions", status_code=201)
    async def post_subscription(who: Who, body: Annotated[dict[str, Any], Depends(body_of)]
                                ) -> dict[str, Any]:
        checked(SubscriptionIn, body)
        return stored("subscriptions", who, body)

    @router.get("/subscriptions/{subscription_id}")
    async def get_subscription(subscription_id: str, who: Who) -> dict[str, Any]:
        return owned("subscriptions", who, subscription_id)

    @router.delete("/subscriptions/{subscription_id}")
    async def delete_subscription(subscription_id: str, who: Who) -> dict[str, Any]:
        found = owned("subscriptions", who, subscription_id)
        store.delete("subscriptions", who.fsp, subscription_id)
        return found

    @router.get("/reports")
    async def get_reports(who: Who, programID: str | None = None,
                          eventID: str | None = None, skip: int = 0,
                          limit: int = 50) -> list[dict[str, Any]]:
        return listing("reports", who, {"programID": programID, "eventID": eventID}, skip,
                       limit)

    @router.post("/reports", status_code=201)
    async def post_report(who: Who, body: Annotated[dict[str, Any], Depends(body_of)]
                          ) -> dict[str, Any]:
        checked(ReportIn, body)
        event_id = body["eventID"]
        view = service.engine.visible(event_id, "fsp", who.fsp)
        if view is None:
            raise OadrProblem(404, f"no event {event_id}")
        report = new_object("reports", body, who, service.clock())
        report["programID"] = view.latest.instruction.contract_id or UNRECONCILED_PROGRAM
        # A report on the event shows the VEN has it: the revision's OpenADR delivery.
        service.openadr_reached(view)
        answer = ack_of_report(report)
        if answer is not None:
            response, reason = answer
            try:
                await service.acknowledge(who.fsp, event_id, Ack(
                    id=event_id, revision=view.latest.instruction.revision,
                    response=response, reason=reason))  # type: ignore[arg-type]
            except ValidationError as exc:
                raise OadrProblem(400, f"the report as an answer: {problem_of(exc)}"
                                  ) from None
            except Refusal as refusal:
                raise OadrProblem(409, "; ".join(p.reason for p in refusal.problems)
                                  ) from refusal
        store.put("reports", who.fsp, report)
        return report

    # ---------------------------------------------------------------- notifiers

    @router.get("/notifiers")
    async def notifiers(who: Who) -> dict[str, Any]:
        return {"WEBHOOK": True, "MQTT": {
            "URIS": [service.openadr_mqtt_uri], "serialization": "JSON",
            "authentication": {"method": "ANONYMOUS"}}}

    @router.get("/notifiers/mqtt/topics/events")
    async def topics_events(who: Who) -> dict[str, Any]:
        return mqtt_topics(service.config.openadr.mqtt_topic_prefix, f"fsp/{who.fsp}/events")

    @router.get("/notifiers/mqtt/topics/vens/{ven_id}/events")
    async def topics_ven_events(ven_id: str, who: Who) -> dict[str, Any]:
        owned("vens", who, ven_id)
        return mqtt_topics(service.config.openadr.mqtt_topic_prefix, f"vens/{ven_id}/events")

    @router.get("/notifiers/mqtt/topics/programs/{program_id}/events")
    async def topics_program_events(program_id: str, who: Who) -> dict[str, Any]:
        await get_program(program_id, who)
        return mqtt_topics(service.config.openadr.mqtt_topic_prefix,
                           f"programs/{program_id}/events")

    app.include_router(router)

    @app.api_route(PREFIX + "/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"],
                   include_in_schema=False)
    async def not_here(rest: str) -> Response:
        raise OadrProblem(404, f"{rest} is not part of this VTN")
