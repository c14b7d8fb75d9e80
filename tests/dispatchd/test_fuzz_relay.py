"""Garbage into the relay intake and the UFTP endpoint: bytes, JSON of any shape, XML that
is not UFTP, and correctly signed messages whose content is broken. Never a 5xx, every
refusal says why, and a good message still goes through afterwards."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from base64 import b64decode
from typing import Any

import pytest
from hypothesis import strategies as st
from nacl.bindings import crypto_sign
from shapeshifter_uftp import transport
from shapeshifter_uftp.uftp import SignedMessage, UsefRole

from contracts.io import ContractBook
from dispatchd.localstack import LocalMosquitto
from dispatchd.simulate import wait_for
from dispatchd.uftp import ENDPOINT
from tests.dispatchd.conftest import auth, running
from tests.dispatchd.test_fuzz_channels import drawn, json_values
from tests.dispatchd.test_relay import PLATFORM, dispatch
from tests.dispatchd.test_uftp import DSO, World, mapped, order, send

pytestmark = [pytest.mark.fuzz, pytest.mark.broker, pytest.mark.service]

xml_like = st.builds(
    lambda tag, attrs, text: f"<{tag} {attrs}>{text}</{tag}>".encode(),
    st.sampled_from(["SignedMessage", "FlexOrder", "x", "SignedMessage SenderDomain"]),
    st.text(alphabet="abcdefgh=\" ", max_size=40), st.text(max_size=60))
dispatch_like = st.fixed_dictionaries({}, optional={
    "external_id": st.one_of(st.text(max_size=300), st.integers(), st.none()),
    "kind": st.one_of(st.sampled_from(["instruct", "cancel", "amend"]), st.integers()),
    "fsp": st.one_of(st.text(max_size=20), st.none()),
    "direction": st.sampled_from(["turn_down", "turn_up", "sideways"]),
    "capacity_mw": st.one_of(st.floats(allow_nan=False), st.text(max_size=4)),
    "profile_mw": st.lists(st.floats(-1, 1e9, allow_nan=False), max_size=5),
    "start": st.one_of(st.datetimes(timezones=st.just(dt.UTC)).map(dt.datetime.isoformat),
                       st.text(max_size=10)),
    "end": st.datetimes(timezones=st.just(dt.UTC)).map(dt.datetime.isoformat),
})


def test_garbage_to_relay_and_uftp_never_breaks_the_service(
        tmp_path: Any, broker: LocalMosquitto, live_book: ContractBook) -> None:
    world = World(tmp_path, broker, live_book)
    relay_bodies = [*(json.dumps(v).encode() for v in drawn(json_values, 80)),
                    *(json.dumps(v).encode() for v in drawn(dispatch_like, 120)),
                    *drawn(st.binary(max_size=200), 40)]
    uftp_bodies = [*drawn(st.binary(max_size=300), 60), *drawn(xml_like, 60)]
    signed_inner = [b"<FlexOrder/>", b"not xml", b"<TestMessage Version='9'/>",
                    *drawn(xml_like, 30)]

    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack:
            await mapped(stack, world)
            statuses: list[int] = []
            for body in relay_bodies:
                r = await stack.client.post(f"/v1/relay/{PLATFORM}/dispatches", content=body,
                                            headers=auth("platform", PLATFORM))
                statuses.append(r.status_code)
                if r.status_code >= 400:
                    assert r.json()["problems"][0]["reason"], body
            for body in uftp_bodies:
                r = await stack.client.post(ENDPOINT, content=body,
                                            headers={"Content-Type": "text/xml"})
                statuses.append(r.status_code)
                assert r.status_code in (200, 400, 401), (body, r.status_code)
                assert r.status_code == 200 or r.text
            for inner in signed_inner:
                sealed = crypto_sign(inner, b64decode(world.dso_private))
                body = transport.to_xml(SignedMessage(sender_domain=DSO,
                                                      sender_role=UsefRole.DSO, body=sealed))
                r = await stack.client.post(ENDPOINT, content=body,
                                            headers={"Content-Type": "text/xml"})
                statuses.append(r.status_code)
                assert r.status_code in (200, 400), (inner, r.status_code, r.text)
            assert max(statuses) < 500
            print(f"relay/UFTP garbage: {len(statuses)} requests, statuses "
                  f"{sorted(set(statuses))}, 0 of 5xx")
            # still working: a good relayed dispatch and a good signed order
            good_dispatch = dispatch(str(uuid.uuid4()), fsp=world.agr_domain,
                                     contract="DSO-K-19")
            r = await stack.client.post(f"/v1/relay/{PLATFORM}/dispatches",
                                        headers=auth("platform", PLATFORM),
                                        content=json.dumps(good_dispatch))
            assert r.status_code == 202 and r.json()["dispatches"][0]["status"] == "relayed"
            good = order()
            async with world.dso() as dso:
                await send(world.client(stack), good)
                iid = f"{PLATFORM}:{good.message_id}"
                assert await wait_for(lambda: iid in stack.service.engine.ids(), 5)
                await asyncio.sleep(0)
            assert dso.refused == []

    asyncio.run(scenario())
