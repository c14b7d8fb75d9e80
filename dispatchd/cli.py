"""The ``dispatchd`` command: serve, send, tail, export, demo, webhook-secret,
broker-config."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

EXAMPLES = """\
examples:
  dispatchd serve --config demo/config.toml
  dispatchd send --contract C00003 --mw 1.5 --start +10m --end +70m
  dispatchd tail --since 0
  dispatchd export --config demo/config.toml --month 2026-10
  dispatchd demo
  dispatchd webhook-secret
  dispatchd broker-config --config market/config.toml --out broker
  dispatchd relay map dsoflex fsp AGR-7 FSP003
  dispatchd relay exceptions
  dispatchd reconcile dsoflex:ORD-1 --contract C00003

The client commands (send, tail, relay, reconcile) read the service URL from --url or FLEXOPS_URL
(default http://127.0.0.1:8080) and the bearer token from --token or FLEXOPS_TOKEN.
"""


def _when(text: str) -> str:
    """``now``, ``+15m``/``+2h``/``+30s`` from now, or an ISO 8601 time with an offset."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    if text == "now":
        return now.isoformat()
    match = re.fullmatch(r"\+(\d+)([smh])", text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours"}[match[2]]
        return (now + dt.timedelta(**{unit: int(match[1])})).isoformat()
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not now, +Nm/+Nh or an ISO time") from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset (e.g. +00:00 or Z)")
    return parsed.isoformat()


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("FLEXOPS_URL", "http://127.0.0.1:8080"),
                        help="dispatchd base URL (env FLEXOPS_URL)")
    parser.add_argument("--token", default=os.environ.get("FLEXOPS_TOKEN"),
                        help="bearer token of an SO or FSP (env FLEXOPS_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatchd",
        description="flexops dispatch service: accepts SO instructions, journals them "
        "durably and delivers them to FSPs until they acknowledge.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the service",
                           description="Run dispatchd: check every FSP's channel settings, "
                           "replay the journal, re-send anything unacknowledged, then serve the "
                           "HTTP API and websocket streams and deliver over MQTT, email and "
                           "webhooks. SIGHUP re-reads [[auth.principals]] from the config "
                           "file (token rotation without a restart). Exit status 2 on a "
                           "configuration problem.")
    serve.add_argument("--config", required=True, type=Path,
                       help="TOML configuration (see docs/configuration.md)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="overrides service.listen")
    serve.add_argument("--mqtt", metavar="URL", help="overrides mqtt.url (mqtt://HOST:PORT)")

    send = sub.add_parser("send", help="issue an instruction as an SO",
                          description="Issue one instruction and print the service's answer. "
                          "Exit status 0 when accepted, 1 when refused.")
    _client_args(send)
    send.add_argument("--contract", required=True, help="contract id")
    send.add_argument("--mw", type=float, help="flat capacity in MW")
    send.add_argument("--profile", help="comma-separated MW per half hour from start")
    send.add_argument("--start", required=True, type=_when, help="now, +15m, or ISO time")
    send.add_argument("--end", required=True, type=_when, help="+90m, or ISO time")
    send.add_argument("--respond-by", type=_when, help="default: the contract's response time")
    send.add_argument("--id", help="idempotency key (default: generated)")
    send.add_argument("--assets", help="comma-separated subset of the obligated assets")
    send.add_argument("--note", default="")
    send.add_argument("--override", metavar="REASON", help="force out-of-contract terms")
    send.add_argument("--test", action="store_true", help="mark as a test instruction")

    tail = sub.add_parser("tail", help="follow instructions and their states live",
                          description="Print one line per instruction change visible to the "
                          "token's SO or FSP, oldest first, then keep following.")
    _client_args(tail)
    tail.add_argument("--since", type=int, default=0, help="cursor to start after (default 0)")
    tail.add_argument("--interval", type=float, default=0.5, help="poll interval in seconds")
    tail.add_argument("--once", action="store_true", help="print what is there and exit")

    export = sub.add_parser(
        "export", help="write one month's dispatch log (Parquet) for settlement",
        description="Read the journal (read-only; dispatchd may keep running) and write every "
        "revision of the instructions overlapping the month (local calendar month) as a "
        "Parquet file whose columns docs/settlement.md lists.")
    export.add_argument("--config", required=True, type=Path,
                        help="the dispatchd configuration (for the journal and contracts)")
    export.add_argument("--month", required=True, help="YYYY-MM")
    export.add_argument("--out", type=Path,
                        help="output file (default dispatch-log-YYYY-MM.parquet)")
    export.add_argument("--tz", default="Europe/London", help="time zone of the month")

    demo = sub.add_parser("demo", help="run the whole stack on a sample market and report",
                          description="Start a private Mosquitto, dispatchd on a sample "
                          "market, simulated FSP control centres and an SO control room; "
                          "print a summary and exit.")
    demo.add_argument("--out", type=Path, default=Path("demo-out"),
                      help="working directory for contracts, config and journal")
    demo.add_argument("--instructions", type=int, default=300, help="size of the burst")
    demo.add_argument("--rate", type=float, default=100.0, help="instructions per second")

    relay = sub.add_parser(
        "relay", help="another platform's id mappings and held dispatches (SO)",
        description="The mapping table of a relaying platform (its FSP, contract and asset "
        "ids to ours) and the exceptions list. Adding a mapping relays at once every held "
        "dispatch it identifies. Exit status 0 on success, 1 when refused.")
    relay_sub = relay.add_subparsers(dest="relay_command", required=True, metavar="ACTION")
    relay_map = relay_sub.add_parser("map", help="map one external id to ours")
    relay_unmap = relay_sub.add_parser("unmap", help="remove a mapping")
    for action in (relay_map, relay_unmap):
        _client_args(action)
        action.add_argument("platform", help="the platform's name in [relay.platforms]")
        action.add_argument("kind", choices=("fsp", "contract", "asset"))
        action.add_argument("external", help="the platform's id")
    relay_map.add_argument("ours", help="our FSP, contract or asset id")
    relay_list = relay_sub.add_parser("mappings", help="print a platform's mappings")
    _client_args(relay_list)
    relay_list.add_argument("platform")
    relay_exceptions = relay_sub.add_parser(
        "exceptions", help="print held dispatches and unreconciled instructions")
    _client_args(relay_exceptions)
    reconcile = sub.add_parser(
        "reconcile", help="attach a relayed instruction to its contract (SO)",
        description="Attach a relayed instruction that was delivered without a mapped "
        "contract to its contract (and assets: all the contract's unless named). Settlement "
        "invoices it only once reconciled. Exit status 0 on success, 1 when refused.")
    _client_args(reconcile)
    reconcile.add_argument("id", help="the instruction id (platform:external id)")
    reconcile.add_argument("--contract", required=True, help="our contract id")
    reconcile.add_argument("--assets", help="comma-separated subset of the contract's assets")
    sub.add_parser("webhook-secret", help="print a new webhook signing secret",
                   description="Print a new random secret in the Standard Webhooks form "
                   "(whsec_ + base64). Put it in the environment variable that the FSP's "
                   "webhook_secret_env names, and give it to the FSP to verify signatures.")
    broker = sub.add_parser(
        "broker-config", help="write Mosquitto accounts and ACLs from the contracts data",
        description="Write mosquitto.conf, a hashed password file, an ACL and "
        "credentials.json (mode 600) into --out: one account per FSP on the MQTT channel, "
        "allowed to read only its own instructions and errors and write only its own acks, "
        "and one for dispatchd. Running again keeps existing passwords. Then start "
        "mosquitto -c OUT/mosquitto.conf, set mqtt.username and mqtt.password_env for "
        "dispatchd, and give each FSP its entry of credentials.json.")
    broker.add_argument("--config", required=True, type=Path,
                        help="the dispatchd configuration (contracts, topic prefix)")
    broker.add_argument("--out", required=True, type=Path, help="directory to write into")
    broker.add_argument("--listen", default="127.0.0.1:1883", metavar="HOST:PORT",
                        help="the broker's listener (default 127.0.0.1:1883)")
    broker.add_argument("--persistence-dir", type=Path,
                        help="where Mosquitto keeps sessions (default OUT/data)")
    broker.add_argument("--tls-cert", type=Path, help="certificate file: a TLS listener")
    broker.add_argument("--tls-key", type=Path, help="its private key")
    broker.add_argument("--tls-ca", type=Path, help="CA file, to ask clients for certificates")
    broker.add_argument("--broker-user", default="mosquitto",
                        help="the user Mosquitto runs as when started as root (default "
                        "mosquitto); it must own the written files")
    return parser


def _headers(token: str | None) -> dict[str, str]:
    if not token:
        sys.exit("dispatchd: a token is needed (--token or FLEXOPS_TOKEN)")
    return {"Authorization": f"Bearer {token}"}


def _print_refusal(response: httpx.Response) -> None:
    try:
        body = response.json()
    except ValueError:
        print(f"refused ({response.status_code}): {response.text}", file=sys.stderr)
        return
    print(f"refused ({response.status_code}, {body.get('error')}):", file=sys.stderr)
    for problem in body.get("problems", []):
        print(f"  {problem['field']}: {problem['reason']}", file=sys.stderr)


def cmd_send(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"contract_id": args.contract, "start": args.start, "end": args.end,
                            "note": args.note, "test": args.test}
    for key, value in (("capacity_mw", args.mw), ("respond_by", args.respond_by),
                       ("id", args.id), ("override", args.override)):
        if value is not None:
            body[key] = value
    if args.profile:
        body["profile_mw"] = [float(v) for v in args.profile.split(",")]
    if args.assets:
        body["assets"] = args.assets.split(",")
    try:
        response = httpx.post(f"{args.url}/v1/instructions", json=body,
                              headers=_headers(args.token), timeout=10)
    except httpx.HTTPError as exc:
        print(f"dispatchd: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    if response.status_code >= 300:
        _print_refusal(response)
        return 1
    data = response.json()
    print(f"{'accepted' if data['created'] else 'already submitted'}: {data['id']} "
          f"revision {data['revision']} state {data['state']}\nstatus: {data['status_url']}")
    return 0


def _tail_line(item: dict[str, Any]) -> str:
    inst = item["instruction"]
    latest = item["revisions"][-1]
    ack = latest["ack"]
    extra = f" ({ack['response']}: {ack['reason']})" if ack and ack["reason"] else ""
    return (f"{item['cursor']:>8} {inst['id']:<34} r{inst['revision']:<2} "
            f"{item['state']:<22} {inst['fsp']:<8} {inst['contract_id']:<8} "
            f"{inst['capacity_mw']:>6g} MW {inst['start'][11:16]}–{inst['end'][11:16]}Z"
            f"{extra}")


def cmd_tail(args: argparse.Namespace) -> int:
    cursor = args.since
    headers = _headers(args.token)
    with httpx.Client(base_url=args.url, headers=headers, timeout=10) as client:
        while True:
            try:
                response = client.get("/v1/instructions", params={"since": cursor,
                                                                  "limit": 1000})
            except httpx.HTTPError as exc:
                print(f"dispatchd: {args.url}: {exc}; retrying", file=sys.stderr)
                time.sleep(max(args.interval, 1.0))
                continue
            if response.status_code != 200:
                _print_refusal(response)
                return 1
            data = response.json()
            for item in data["instructions"]:
                print(_tail_line(item), flush=True)
            cursor = data["cursor"]
            if args.once and not data["instructions"]:
                return 0
            if not data["instructions"]:
                time.sleep(args.interval)


def cmd_serve(args: argparse.Namespace) -> int:
    from contracts.io import ContractsFileError, load_contracts
    from dispatchd.config import ConfigError, load_config
    from dispatchd.journal import JournalError
    from dispatchd.service import Service

    try:
        config = load_config(args.config, listen=args.listen, mqtt=args.mqtt)
        book = load_contracts(config.service.contracts)
    except (ConfigError, ContractsFileError) as exc:
        print(f"dispatchd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.service.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        runner = asyncio.run

    async def main() -> None:
        service = Service(config, book)
        loop = asyncio.get_running_loop()

        def reload_tokens() -> None:
            """SIGHUP: read [auth] again from the config file (tokens rotate without a
            restart); a config that no longer loads leaves the current tokens in place."""
            try:
                fresh = load_config(args.config, listen=args.listen, mqtt=args.mqtt)
            except ConfigError as exc:
                logging.getLogger("dispatchd").error("SIGHUP: tokens kept: %s", exc)
                return
            service.replace_principals(fresh.auth.principals)

        loop.add_signal_handler(signal.SIGHUP, reload_tokens)
        await service.run()

    try:
        runner(main())
    except (JournalError, ConfigError) as exc:
        print(f"dispatchd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from contracts.io import ContractsFileError, load_contracts
    from dispatchd.brokerconfig import BrokerConfigError, Tls, write_broker_config
    from dispatchd.config import ConfigError, load_config

    if (args.tls_cert is None) != (args.tls_key is None):
        print("dispatchd: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls = Tls(args.tls_cert.resolve(), args.tls_key.resolve(),
              args.tls_ca.resolve() if args.tls_ca else None) if args.tls_cert else None
    try:
        config = load_config(args.config)
        book = load_contracts(config.service.contracts)
        files = write_broker_config(book, config, args.out, listen=args.listen,
                                    persistence_dir=args.persistence_dir, tls=tls,
                                    broker_user=args.broker_user)
    except (ConfigError, ContractsFileError, BrokerConfigError) as exc:
        print(f"dispatchd: {exc}", file=sys.stderr)
        return 2
    print(f"{files.conf}: {len(files.accounts) - 1} FSP accounts and dispatchd's "
          f"({files.accounts['dispatchd']})")
    print(f"  start the broker:  mosquitto -c {files.conf}")
    print(f"  dispatchd config:  [mqtt] username = \"{files.accounts['dispatchd']}\", "
          "password_env = \"FLEXOPS_MQTT_PASSWORD\"")
    print(f"  passwords (mode 600, hand each FSP its own): {files.credentials}")
    return 0


def _call(method: str, url: str, token: str | None, body: Any = None
          ) -> dict[str, Any] | None:
    """One API call; the answer's JSON, or None after printing why it failed."""
    try:
        response = httpx.request(method, url, json=body, headers=_headers(token), timeout=10)
    except httpx.HTTPError as exc:
        print(f"dispatchd: cannot reach {url}: {exc}", file=sys.stderr)
        return None
    if response.status_code >= 300:
        _print_refusal(response)
        return None
    return dict(response.json())


def cmd_relay(args: argparse.Namespace) -> int:
    base = f"{args.url}/v1/relay"
    if args.relay_command == "exceptions":
        data = _call("GET", f"{base}/exceptions", args.token)
        if data is None:
            return 1
        print(f"held (no FSP mapping, not delivered): {len(data['held'])}")
        for held in data["held"]:
            print(f"  {held['at']}  {held['platform']} {held['external_id']}: {held['reason']}")
        print(f"unreconciled (delivered, not settled until reconciled): "
              f"{len(data['unreconciled'])}")
        for item in data["unreconciled"]:
            missing = "; ".join(item["instruction"]["unreconciled"])
            print(f"  {item['id']} -> {item['instruction']['fsp']}: {missing}")
        return 0
    if args.relay_command == "mappings":
        data = _call("GET", f"{base}/{args.platform}/mappings", args.token)
    else:
        url = f"{base}/{args.platform}/mappings/{args.kind}/{args.external}"
        data = (_call("PUT", url, args.token, {"ours": args.ours})
                if args.relay_command == "map" else _call("DELETE", url, args.token))
    if data is None:
        return 1
    for mapping in data["mappings"]:
        print(f"{mapping['kind']:<9} {mapping['external']} -> {mapping['ours']}")
    for item in data["released"]:
        print(f"released: {item['external_id']} relayed as {item['id']} to {item['fsp']}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"contract_id": args.contract}
    if args.assets:
        body["assets"] = args.assets.split(",")
    data = _call("POST", f"{args.url}/v1/instructions/{args.id}/reconcile", args.token, body)
    if data is None:
        return 1
    inst = data["instruction"]
    print(f"{'reconciled' if data['created'] else 'already reconciled'}: {data['id']} "
          f"contract {inst['contract_id']} assets {','.join(inst['assets'])}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from contracts.io import ContractsFileError, load_contracts
    from dispatchd.config import ConfigError, load_config
    from dispatchd.export import dispatch_log, write_dispatch_log
    from dispatchd.journal import JournalError

    try:
        config = load_config(args.config)
        book = load_contracts(config.service.contracts)
        frame = dispatch_log(config.journal.path, book, args.month, tz=args.tz)
    except (ConfigError, ContractsFileError, JournalError, ValueError) as exc:
        print(f"dispatchd: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path(f"dispatch-log-{args.month}.parquet")
    write_dispatch_log(frame, out)
    instructions = int(frame["latest"].sum())
    print(f"{out}: {frame.height} revisions of {instructions} instructions for {args.month}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "send":
        return cmd_send(args)
    if args.command == "tail":
        try:
            return cmd_tail(args)
        except KeyboardInterrupt:
            return 0
    if args.command == "export":
        return cmd_export(args)
    if args.command == "broker-config":
        return cmd_broker_config(args)
    if args.command == "relay":
        return cmd_relay(args)
    if args.command == "reconcile":
        return cmd_reconcile(args)
    if args.command == "webhook-secret":
        from dispatchd.webhooks import new_secret

        print(new_secret())
        return 0
    from dispatchd.demo import run_demo

    return run_demo(out=args.out, instructions=args.instructions, rate=args.rate)


if __name__ == "__main__":
    sys.exit(main())

