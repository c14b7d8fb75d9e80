"""A VEN built on the openadr3-client library (PyPI, not written here), run by the tests in
its own Python >= 3.12 environment (``.venv-ven``, made by ``./dev setup``).

It prints one JSON object per line for the test to read:

``--mode ven``: registers a VEN and a resource, lists its programs, subscribes (webhook to
its own HTTP listener) and listens on the MQTT topics the VTN names; prints every
notification received, answers each create and update with an ``OPERATING_STATE``
report (``ACCEPTED``), and each delete too, until its standard input closes.

``--mode spy --event ID``: another FSP's credentials; prints what they can see of the
event and whether a report on it is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from openadr3_client._auth.config_builder import build_token_manager_config
from openadr3_client._models.common.interval import Interval
from openadr3_client.oadr310._vtn.http.subscriptions import SubscriptionsHttpInterface
from openadr3_client.oadr310._vtn.mqtt.client import MQTTClient
from openadr3_client.oadr310.models.event.event import ExistingEvent
from openadr3_client.oadr310.models.report.report import NewReport, ReportResource
from openadr3_client.oadr310.models.report.report_payload import (
    ReportPayload,
    ReportPayloadType,
)
from openadr3_client.oadr310.models.resource.resource import NewResourceVenRequest
from openadr3_client.oadr310.models.subscriptions.subscription import (
    NewSubscription,
    Object,
    ObjectOperation,
    Operation,
)
from openadr3_client.oadr310.models.ven.ven import NewVenVenRequest
from openadr3_client.ven.http_factory import VirtualEndNodeHttpClientFactory
from openadr3_client.version import OADRVersion

HOOK_TOKEN = "ven-hook-token"
lock = threading.Lock()


def say(**fields: Any) -> None:
    with lock:
        print(json.dumps(fields), flush=True)


def client(args: argparse.Namespace) -> Any:
    return VirtualEndNodeHttpClientFactory.create_http_ven_client(
        vtn_base_url=args.vtn, client_id=args.client_id, client_secret=args.secret,
        allow_insecure_http=True, version=OADRVersion.OADR_310)


def acknowledge(ven: Any, event_id: str, resource: str) -> None:
    report = ven.reports.create_report(NewReport(
        event_id=event_id, client_name=resource, report_name="acknowledgement",
        resources=(ReportResource(resource_name=resource, intervals=(Interval(
            id=0, payloads=(ReportPayload(type=ReportPayloadType.OPERATING_STATE,
                                          values=("ACCEPTED",)),)),)),)))
    say(step="report", event=event_id, id=report.id)


def run_ven(args: argparse.Namespace) -> None:
    ven = client(args)
    registered = ven.vens.create_ven(NewVenVenRequest(ven_name=args.ven_name))
    resource = ven.resources.create_resource(NewResourceVenRequest(
        resource_name=f"{args.ven_name}-battery", ven_id=registered.id))
    say(step="registered", ven=registered.id, resource=resource.id)
    programs = ven.programs.get_programs(target=None, pagination=None)
    say(step="programs", ids=[p.id for p in programs])

    def notified(via: str, body: dict[str, Any]) -> None:
        shown = ExistingEvent.model_validate(body["object"])
        say(step="notified", via=via, operation=body["operation"], event=shown.id,
            modified=shown.modification_date_time.isoformat(),
            values=[p.values[0] for i in shown.intervals or () for p in i.payloads])
        if via == "webhook":
            acknowledge(ven, shown.id, resource.resource_name)

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(size))
            allowed = self.headers.get("Authorization") == f"Bearer {HOOK_TOKEN}"
            self.send_response(200 if allowed else 401)
            self.end_headers()
            if allowed:
                notified("webhook", body)
            else:
                say(step="unauthorised webhook")

        def log_message(self, *_: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = build_token_manager_config(
        client_id=args.client_id, client_secret=args.secret, token_url=None, scopes=None,
        audience=None, vtn_base_url=args.vtn, verify_vtn_tls_certificate=True,
        version=OADRVersion.OADR_310, factory_name="test VEN")
    subscriptions = SubscriptionsHttpInterface(args.vtn, config, allow_insecure_http=True)
    subscription = subscriptions.create_subscription(NewSubscription(
        client_name=args.ven_name, program_id=None, object_operations=(ObjectOperation(
            objects=(Object.EVENT,), operations=(Operation.POST, Operation.PUT,
                                                 Operation.DELETE),
            callback_url=f"http://127.0.0.1:{server.server_address[1]}/notify",
            bearer_token=HOOK_TOKEN),)))
    say(step="subscribed", id=subscription.id)

    notifiers = ven.notifiers.get_notifiers()
    topics = ven.notifiers.get_event_topics_for_ven(registered.id).topics
    mqtt = MQTTClient(notifiers.mqtt)
    broker = urlparse(str(notifiers.mqtt.uris[0]))
    subscribed = threading.Event()
    mqtt.on_connect = lambda c, *_: c.subscribe(topics.all, qos=1)
    mqtt.on_subscribe = lambda *_: subscribed.set()
    mqtt.on_message = lambda _c, _u, m: notified("mqtt", json.loads(m.payload))
    mqtt.connect(broker.hostname or "127.0.0.1", broker.port or 1883)
    mqtt.loop_start()
    subscribed.wait(10)
    say(step="listening", topic=topics.all)
    say(step="ready")
    sys.stdin.read()
    events = ven.events.get_events(target=None, pagination=None, program_id=None)
    say(step="events", ids=[e.id for e in events])
    mqtt.loop_stop()
    server.shutdown()


def run_spy(args: argparse.Namespace) -> None:
    spy = client(args)
    events = spy.events.get_events(target=None, pagination=None, program_id=None)
    programs = spy.programs.get_programs(target=None, pagination=None)
    found: dict[str, Any] = {"events": [e.id for e in events],
                             "programs": [p.id for p in programs]}
    for name, call in (
            ("get", lambda: spy.events.get_event_by_id(args.event)),
            ("report", lambda: acknowledge(spy, args.event, "spy")),
            ("topics", lambda: spy.notifiers.get_event_topics_for_ven(args.ven))):
        try:
            call()
            found[name] = "allowed"
        except Exception as exc:  # the library raises requests' HTTPError
            found[name] = getattr(getattr(exc, "response", None), "status_code", repr(exc))
    say(step="spy", **found)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("ven", "spy"), required=True)
    parser.add_argument("--vtn", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--ven-name", default="ven-1")
    parser.add_argument("--event")
    parser.add_argument("--ven")
    args = parser.parse_args()
    run_ven(args) if args.mode == "ven" else run_spy(args)


if __name__ == "__main__":
    main()
