"""The webhook bridge against any body and any header (SPEC §7): a signed body that is JSON but not an
object is 400 and is not forwarded; and while the server is up, nothing a sender posts (signed or
not) gets a 5xx (which Stripe would retry forever) or moves money."""

from __future__ import annotations

import gzip
import http.client
import json
import time
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stripe_support import WEBHOOK_SECRET, CardStack, stripe_signature

from server.services import stripe_events

pytestmark = pytest.mark.stripe



@pytest.fixture
def forwarded(cards: CardStack, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bodies the bridge forwards to the server (localstripe's own late webhooks of earlier
    tests may be among them: a test looks for its own)."""
    seen: list[bytes] = []
    bridge = cards.bridge.bridge
    real = bridge.forward

    async def spy(event_id: str, event_type: str, payload_json: str) -> tuple[int, str]:
        seen.append(payload_json.encode())
        return await real(event_id, event_type, payload_json)

    monkeypatch.setattr(bridge, "forward", spy)
    return seen


def post_raw(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", parts.path, body=body, headers={"Content-Length": str(len(body)), **headers})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("body", [b"[1,2,3]", b"null", b"42", b'"evt"', b"true", b"[]", b"{}", b'{"id": 1}',
                                  b'{"id": "evt_1"}', b'{"id": "evt_1", "type": ["x"]}', b"[" * 100_000,
                                  b'{"id": "\\ud800", "type": "payment_intent.succeeded"}', b"\xff\xfe{}",
                                  '{"id": "evt_é", "type": "x"}'.encode("utf-16")])
def test_a_signed_body_that_is_not_an_event_object_is_400_and_not_forwarded(
        cards: CardStack, forwarded: list[bytes], body: bytes) -> None:
    status, answer = post_raw(cards.bridge.webhook_url, body, {"Stripe-Signature": stripe_signature(body),
                                                               "Content-Type": "application/json"})
    assert status == 400, answer
    assert body not in forwarded


def test_a_body_that_cannot_be_decoded_as_sent_is_400(cards: CardStack, forwarded: list[bytes]) -> None:
    body = b'{"id": "evt_gz", "type": "customer.created", "data": {"object": {"id": "cus_1"}}}'
    for encoding, sent in (("gzip", body), ("deflate", b"not deflated"), ("br", b"\x00\x01"),
                           ("gzip", gzip.compress(body)[:-4])):
        status, _ = post_raw(cards.bridge.webhook_url, sent, {"Stripe-Signature": stripe_signature(sent),
                                                              "Content-Encoding": encoding})
        assert status == 400, encoding
    assert not any(b"evt_gz" in payload for payload in forwarded)


# ---------------------------------------------------------------- the fuzz
EVENT_TYPES = [*stripe_events.HANDLED_TYPES, "customer.created", "payment_intent.created", ""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


@st.composite
def stripe_objects(draw: st.DrawFn, member_ref: dict[str, str]) -> dict:
    """Something shaped like the objects Stripe sends, with any value in any field; sometimes
    carrying a real member's metadata (the forger's best try)."""
    obj: dict = {"id": draw(st.sampled_from(["pi_", "seti_", "ch_", "cus_"])) + draw(st.text(max_size=24))
                 if draw(st.booleans()) else draw(json_values)}
    for name in ("amount", "amount_refunded", "currency", "status", "customer", "payment_method", "payment_intent",
                 "last_payment_error", "created"):
        if draw(st.booleans()):
            obj[name] = draw(st.sampled_from([5_000_00, 100_00, -1, 2**70, "aud", "usd", "succeeded", None])
                             | json_values)
    if draw(st.booleans()):
        obj["metadata"] = dict(member_ref) if draw(st.booleans()) else draw(json_values)
    return obj


@st.composite
def bodies(draw: st.DrawFn, member_ref: dict[str, str]) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "event"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    event = {"id": draw(st.uuids().map(lambda u: f"evt_{u.hex}") | st.text(max_size=30) | json_values),
             "type": draw(st.sampled_from(EVENT_TYPES) | st.text(max_size=30)),
             "object": "event",
             "data": draw(st.fixed_dictionaries({"object": stripe_objects(member_ref)}) | json_values)}
    return json.dumps(event, ensure_ascii=draw(st.booleans())).encode()


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@st.composite
def signatures(draw: st.DrawFn, body: bytes) -> str | None:
    how = draw(st.sampled_from(["good", "good", "none", "wrong-secret", "stale", "future", "garbage", "tampered"]))
    if how == "good":
        return stripe_signature(body)
    if how == "none":
        return None
    if how == "wrong-secret":
        return stripe_signature(body, secret=WEBHOOK_SECRET + "x")
    if how == "stale":
        return stripe_signature(body, timestamp=int(time.time()) - 301)
    if how == "future":
        return stripe_signature(body, timestamp=int(time.time()) + draw(st.integers(0, 2**40)))
    if how == "tampered":
        return stripe_signature(body + b" ")
    return draw(header_text)


def test_fuzz_no_5xx_and_no_money_moves(cards: CardStack) -> None:
    real = cards.top_up_now(1, 100_00)  # a real member with real card money, whose metadata the fuzz borrows
    member_ref = cards.stripe.v1.payment_intents.retrieve(real).to_dict()["metadata"]
    before = (cards.balances(), cards.posting_count(), len(cards.outbox()))
    statuses: list[int] = []

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def post_anything(data: st.DataObject) -> None:
        body = data.draw(bodies(member_ref), label="body")
        headers: dict[str, str] = {}
        signature = data.draw(signatures(body), label="signature")
        if signature is not None:
            headers["Stripe-Signature"] = signature
        headers["Content-Type"] = data.draw(st.sampled_from(["application/json", "text/plain", ""]) | header_text)
        if data.draw(st.booleans()):
            headers[data.draw(st.sampled_from(["X-Request-Id", "Content-Encoding", "X-Anything", "Accept"]))] = \
                data.draw(header_text)
        status, answer = post_raw(cards.bridge.webhook_url, body, headers)
        statuses.append(status)
        assert status < 500, (status, answer, body[:200], headers)

    post_anything()
    assert (cards.balances(), cards.posting_count(), len(cards.outbox())) == before
    assert 200 in statuses and 400 in statuses  # both kinds of answer were reached
    cards.assert_invariants()
