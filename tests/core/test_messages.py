"""The wire codec: round trips, and a reason for every rejection (tables, then properties)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastapi_leader.messages import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Codec,
    Kind,
    Message,
    MessageRejected,
    RejectReason,
)

GROUP = "billing"
KEY = b"k" * 32
OLD_KEY = b"old-key-0123456789abcdef"
NEW_KEY = b"new-key-0123456789abcdef"
_MAX_INT = 2**63 - 1
# The kinds that name a target (the spec as these tests read it, restated on purpose).
TARGETED_KINDS = (Kind.VOTE, Kind.HANDOVER, Kind.RESIGN_REQUEST)

FAST = settings(
    max_examples=300,
    deadline=None,
    database=None,  # nothing written to the working tree
    suppress_health_check=[HealthCheck.too_slow],
)

UNSIGNED = Codec(GROUP)
SIGNED = Codec(GROUP, [KEY])


def _message(**overrides: Any) -> Message:
    fields: dict[str, Any] = {
        "kind": Kind.HEARTBEAT,
        "group": GROUP,
        "sender": "node-a",
        "term": 7,
        "seq": 1732771200000001,
    }
    fields.update(overrides)
    return Message(**fields)


def _valid_object(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"v": 1, "k": "hb", "g": GROUP, "n": "node-a", "t": 7, "s": 42}
    obj.update(overrides)
    return obj


def _raw(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sign(body: bytes, key: bytes = KEY) -> bytes:
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode() + body


def _rejected(codec: Codec, data: bytes) -> RejectReason:
    with pytest.raises(MessageRejected) as caught:
        codec.decode(data)
    return caught.value.reason


# ---- round trips ------------------------------------------------------------------------------

ROUND_TRIPS = [
    pytest.param(_message(kind=Kind.HEARTBEAT), id="heartbeat"),
    pytest.param(_message(kind=Kind.HEARTBEAT, url="http://10.0.0.7:8000"), id="heartbeat-url"),
    pytest.param(_message(kind=Kind.PRESENCE, term=0), id="presence"),
    pytest.param(_message(kind=Kind.PRESENCE, url="https://a.example/"), id="presence-url"),
    pytest.param(_message(kind=Kind.VOTE_REQUEST), id="vote-request"),
    pytest.param(_message(kind=Kind.VOTE, target="node-b"), id="vote"),
    pytest.param(_message(kind=Kind.HANDOVER, target="node-b"), id="handover"),
    pytest.param(_message(kind=Kind.RESIGN_REQUEST, target="node-b"), id="resign-request"),
    pytest.param(_message(kind=Kind.LEAVE), id="leave"),
    pytest.param(_message(term=_MAX_INT, seq=_MAX_INT), id="largest-numbers"),
    pytest.param(_message(term=0, seq=0), id="zero-numbers"),
    pytest.param(
        _message(kind=Kind.VOTE, sender="s" * 64, target="t" * 64, group=GROUP), id="longest-ids"
    ),
    pytest.param(_message(url="http://h/" + "u" * 503), id="longest-url"),
    pytest.param(_message(sender="n\u00e9\u2603\U0001f600"), id="non-ascii-sender"),
]


@pytest.mark.parametrize("codec", [UNSIGNED, SIGNED], ids=["unsigned", "signed"])
@pytest.mark.parametrize("message", ROUND_TRIPS)
def test_round_trip(codec: Codec, message: Message) -> None:
    data = codec.encode(message)
    assert len(data) <= MAX_MESSAGE_BYTES
    assert codec.decode(data) == message


def test_every_kind_is_in_the_round_trip_table() -> None:
    assert {p.values[0].kind for p in ROUND_TRIPS} == set(Kind)


def test_wire_format_is_compact_json_with_one_letter_keys() -> None:
    data = UNSIGNED.encode(_message(kind=Kind.VOTE, target="node-b", term=3, seq=9))
    assert data == b'{"v":1,"k":"vg","g":"billing","n":"node-a","t":3,"s":9,"c":"node-b"}'


def test_signed_wire_format_is_hex_hmac_then_the_body() -> None:
    message = _message()
    assert SIGNED.encode(message) == _sign(UNSIGNED.encode(message))
    assert SIGNED.signed
    assert not UNSIGNED.signed


def test_message_of_exactly_max_bytes_is_accepted() -> None:
    body = _raw(_valid_object())
    padded = body + b" " * (MAX_MESSAGE_BYTES - len(body))  # JSON allows trailing whitespace
    assert len(padded) == MAX_MESSAGE_BYTES
    assert UNSIGNED.decode(padded).term == 7


def test_regression_encode_never_produces_a_message_decode_rejects_as_oversized() -> None:
    # Limits once counted characters while encode escaped non-ASCII: a legal 512-character URL
    # of non-ASCII characters encoded to ~3 KB, which decode dropped as OVERSIZED.
    message = _message(url="http://h/" + "\u00e9" * 251)
    assert SIGNED.decode(SIGNED.encode(message)) == message
    for worst in (
        _message(sender='"' * 64, url="http://h/" + '"' * 503),
        _message(kind=Kind.VOTE, sender='"' * 64, target="\\" * 64),
    ):
        assert len(SIGNED.encode(worst)) <= MAX_MESSAGE_BYTES
        assert SIGNED.decode(SIGNED.encode(worst)) == worst
    with pytest.raises(ValueError):
        _message(url="http://h/" + "\u00e9" * 252)  # 513 bytes
    with pytest.raises(ValueError):
        _message(url="http://h/\x00")


# ---- rejections -------------------------------------------------------------------------------

REJECTIONS = [
    # size and shape
    pytest.param(b"{" + b" " * MAX_MESSAGE_BYTES + b"}", RejectReason.OVERSIZED, id="oversized"),
    pytest.param(b"x" * (MAX_MESSAGE_BYTES + 1), RejectReason.OVERSIZED, id="oversized-junk"),
    pytest.param(b"", RejectReason.MALFORMED, id="empty"),
    pytest.param(b"{not json", RejectReason.MALFORMED, id="non-json"),
    pytest.param(b"{\xff\xfe}", RejectReason.MALFORMED, id="invalid-utf8"),
    pytest.param(b"[1,2]", RejectReason.MALFORMED, id="json-array"),
    pytest.param(b'"hb"', RejectReason.MALFORMED, id="json-string"),
    pytest.param(b"42", RejectReason.MALFORMED, id="json-number"),
    pytest.param(b"null", RejectReason.MALFORMED, id="json-null"),
    pytest.param(b" " + _raw(_valid_object()), RejectReason.MALFORMED, id="leading-space"),
    pytest.param(_raw(_valid_object()) + b"{}", RejectReason.MALFORMED, id="trailing-data"),
    pytest.param(b"{" * 1500, RejectReason.MALFORMED, id="deep-nesting"),
    # fields present
    *[
        pytest.param(
            _raw({k: v for k, v in _valid_object().items() if k != key}),
            RejectReason.MALFORMED,
            id=f"missing-{key}",
        )
        for key in ("v", "k", "g", "n", "t", "s")
    ],
    pytest.param(_raw(_valid_object(x=1)), RejectReason.MALFORMED, id="extra-field"),
    pytest.param(_raw(_valid_object(kind="hb")), RejectReason.MALFORMED, id="long-key"),
    pytest.param(_raw({}), RejectReason.MALFORMED, id="empty-object"),
    # version
    pytest.param(_raw(_valid_object(v=2)), RejectReason.VERSION, id="version-2"),
    pytest.param(_raw(_valid_object(v=0)), RejectReason.VERSION, id="version-0"),
    pytest.param(_raw(_valid_object(v=True)), RejectReason.MALFORMED, id="version-bool"),
    pytest.param(_raw(_valid_object(v=1.0)), RejectReason.MALFORMED, id="version-float"),
    pytest.param(_raw(_valid_object(v="1")), RejectReason.MALFORMED, id="version-string"),
    pytest.param(_raw(_valid_object(v=None)), RejectReason.MALFORMED, id="version-null"),
    # kind
    pytest.param(_raw(_valid_object(k="zz")), RejectReason.MALFORMED, id="unknown-kind"),
    pytest.param(_raw(_valid_object(k="HEARTBEAT")), RejectReason.MALFORMED, id="kind-by-name"),
    pytest.param(_raw(_valid_object(k=1)), RejectReason.MALFORMED, id="kind-int"),
    pytest.param(_raw(_valid_object(k=None)), RejectReason.MALFORMED, id="kind-null"),
    pytest.param(_raw(_valid_object(k=["hb"])), RejectReason.MALFORMED, id="kind-list"),
    # group
    pytest.param(_raw(_valid_object(g="other")), RejectReason.FOREIGN_GROUP, id="foreign-group"),
    pytest.param(_raw(_valid_object(g="")), RejectReason.FOREIGN_GROUP, id="empty-group"),
    pytest.param(_raw(_valid_object(g=1)), RejectReason.MALFORMED, id="group-int"),
    pytest.param(_raw(_valid_object(g=None)), RejectReason.MALFORMED, id="group-null"),
    pytest.param(_raw(_valid_object(g=[GROUP])), RejectReason.MALFORMED, id="group-list"),
    # sender
    pytest.param(_raw(_valid_object(n="")), RejectReason.MALFORMED, id="sender-empty"),
    pytest.param(_raw(_valid_object(n="x" * 65)), RejectReason.MALFORMED, id="sender-too-long"),
    pytest.param(_raw(_valid_object(n=5)), RejectReason.MALFORMED, id="sender-int"),
    pytest.param(_raw(_valid_object(n=None)), RejectReason.MALFORMED, id="sender-null"),
    pytest.param(_raw(_valid_object(n=True)), RejectReason.MALFORMED, id="sender-bool"),
    # numbers: term and seq
    *[
        pytest.param(
            _raw(_valid_object(**{key: value})), RejectReason.MALFORMED, id=f"{key}-{name}"
        )
        for key in ("t", "s")
        for name, value in [
            ("bool", True),
            ("false", False),
            ("float", 7.0),
            ("fraction", 7.5),
            ("string", "7"),
            ("negative", -1),
            ("huge", 2**63),
            ("huger", 10**30),
            ("null", None),
            ("list", [7]),
            ("object", {"t": 7}),
        ]
    ],
    pytest.param(
        b'{"v":1,"k":"hb","g":"billing","n":"a","t":NaN,"s":1}',
        RejectReason.MALFORMED,
        id="term-nan",
    ),
    pytest.param(
        b'{"v":1,"k":"hb","g":"billing","n":"a","t":1,"s":Infinity}',
        RejectReason.MALFORMED,
        id="seq-infinity",
    ),
    pytest.param(
        b'{"v":1,"k":"hb","g":"billing","n":"a","t":1e400,"s":1}',
        RejectReason.MALFORMED,
        id="term-overflowing-float",
    ),
    # target
    pytest.param(_raw(_valid_object(k="vg")), RejectReason.MALFORMED, id="vote-without-target"),
    pytest.param(_raw(_valid_object(k="ho")), RejectReason.MALFORMED, id="handover-no-target"),
    pytest.param(_raw(_valid_object(k="rs")), RejectReason.MALFORMED, id="resign-no-target"),
    pytest.param(_raw(_valid_object(k="vg", c=None)), RejectReason.MALFORMED, id="null-target"),
    pytest.param(_raw(_valid_object(k="vg", c="")), RejectReason.MALFORMED, id="empty-target"),
    pytest.param(_raw(_valid_object(k="vg", c=3)), RejectReason.MALFORMED, id="target-int"),
    pytest.param(
        _raw(_valid_object(k="vg", c="x" * 65)), RejectReason.MALFORMED, id="target-too-long"
    ),
    *[
        pytest.param(
            _raw(_valid_object(k=kind.value, c="node-b")),
            RejectReason.MALFORMED,
            id=f"target-on-{kind.name.lower()}",
        )
        for kind in (Kind.HEARTBEAT, Kind.PRESENCE, Kind.VOTE_REQUEST, Kind.LEAVE)
    ],
    # url
    pytest.param(_raw(_valid_object(u=None)), RejectReason.MALFORMED, id="null-url"),
    pytest.param(_raw(_valid_object(u="")), RejectReason.MALFORMED, id="empty-url"),
    pytest.param(_raw(_valid_object(u=8000)), RejectReason.MALFORMED, id="url-int"),
    pytest.param(_raw(_valid_object(u="h" * 513)), RejectReason.MALFORMED, id="url-too-long"),
    *[
        pytest.param(
            _raw(_valid_object(k=kind.value, u="http://h/", **extra)),
            RejectReason.MALFORMED,
            id=f"url-on-{kind.name.lower()}",
        )
        for kind, extra in [
            (Kind.VOTE_REQUEST, {}),
            (Kind.VOTE, {"c": "node-b"}),
            (Kind.HANDOVER, {"c": "node-b"}),
            (Kind.LEAVE, {}),
            (Kind.RESIGN_REQUEST, {"c": "node-b"}),
        ]
    ],
]


@pytest.mark.parametrize(("data", "reason"), REJECTIONS)
def test_unsigned_codec_rejects(data: bytes, reason: RejectReason) -> None:
    assert _rejected(UNSIGNED, data) is reason


# Under a valid signature the body is parsed as is: only the size checks and the leading "{"
# test (which tells signed from unsigned) do not apply.
_SIGNED_EXEMPT = {"oversized", "oversized-junk", "empty", "leading-space"}


@pytest.mark.parametrize(("data", "reason"), [p for p in REJECTIONS if p.id not in _SIGNED_EXEMPT])
def test_signed_codec_rejects_correctly_signed_bad_bodies(
    data: bytes, reason: RejectReason
) -> None:
    # A member holding the key can still send garbage; the signature must not excuse it.
    assert _rejected(SIGNED, _sign(data)) is reason


def test_signed_codec_accepts_a_signed_body_with_leading_whitespace() -> None:
    body = b" " + _raw(_valid_object())
    assert SIGNED.decode(_sign(body)).term == 7


def test_oversized_is_checked_before_the_signature() -> None:
    body = _raw(_valid_object()) + b" " * MAX_MESSAGE_BYTES
    assert _rejected(SIGNED, _sign(body)) is RejectReason.OVERSIZED


@pytest.mark.parametrize("data", [bytearray(_raw(_valid_object()))], ids=["bytearray"])
def test_decode_accepts_bytearray(data: bytearray) -> None:
    assert UNSIGNED.decode(data).sender == "node-a"


@pytest.mark.parametrize(
    "data", ["{}", None, 42, memoryview(b"{}")], ids=["str", "none", "int", "memoryview"]
)
def test_decode_rejects_non_bytes_as_malformed(data: Any) -> None:
    assert _rejected(UNSIGNED, data) is RejectReason.MALFORMED


def _tamper_body(data: bytes) -> bytes:
    return data.replace(b'"t":7', b'"t":8')


def _flip_mac_digit(data: bytes) -> bytes:
    first = data[:1]
    return (b"0" if first != b"0" else b"1") + data[1:]


SIGNATURE_CASES = [
    pytest.param(lambda d: UNSIGNED.encode(_message()), RejectReason.UNSIGNED, id="unsigned"),
    pytest.param(_tamper_body, RejectReason.BAD_SIGNATURE, id="tampered-body"),
    pytest.param(_flip_mac_digit, RejectReason.BAD_SIGNATURE, id="flipped-mac-digit"),
    pytest.param(lambda d: d[:64].upper() + d[64:], RejectReason.BAD_SIGNATURE, id="upper-hex"),
    pytest.param(lambda d: d[1:], RejectReason.BAD_SIGNATURE, id="truncated-mac"),
    pytest.param(lambda d: d[:64], RejectReason.BAD_SIGNATURE, id="mac-only"),
    pytest.param(lambda d: b"\xff" * 64 + d[64:], RejectReason.BAD_SIGNATURE, id="non-ascii-mac"),
    pytest.param(lambda d: b"0" * 64 + d[64:], RejectReason.BAD_SIGNATURE, id="zero-mac"),
    pytest.param(
        lambda d: Codec(GROUP, [b"wrong-key-0123456789"]).encode(_message()),
        RejectReason.BAD_SIGNATURE,
        id="wrong-key",
    ),
    pytest.param(lambda d: d + b" ", RejectReason.BAD_SIGNATURE, id="appended-space"),
    pytest.param(lambda d: b"", RejectReason.BAD_SIGNATURE, id="empty"),
    pytest.param(
        lambda d: Codec("other", [KEY]).encode(_message(group="other")),
        RejectReason.FOREIGN_GROUP,
        id="foreign-group-same-key",
    ),
]


@pytest.mark.parametrize(("mutate", "reason"), SIGNATURE_CASES)
def test_signed_codec_rejects(mutate: Any, reason: RejectReason) -> None:
    good = SIGNED.encode(_message())
    assert SIGNED.decode(good) == _message()  # the unmutated message is fine
    assert _rejected(SIGNED, mutate(good)) is reason


def test_signed_message_to_unsigned_codec_is_malformed() -> None:
    assert _rejected(UNSIGNED, SIGNED.encode(_message())) is RejectReason.MALFORMED


@pytest.mark.parametrize(
    ("signer_keys", "verifier_keys", "accepted"),
    [
        pytest.param([OLD_KEY], [NEW_KEY, OLD_KEY], True, id="old-signed-to-rotating"),
        pytest.param([NEW_KEY], [NEW_KEY, OLD_KEY], True, id="new-signed-to-rotating"),
        pytest.param([NEW_KEY, OLD_KEY], [OLD_KEY], False, id="rotating-to-old-only"),
        pytest.param([NEW_KEY, OLD_KEY], [NEW_KEY], True, id="rotating-to-new-only"),
        pytest.param([OLD_KEY], [NEW_KEY], False, id="old-signed-to-new-only"),
        pytest.param([NEW_KEY, OLD_KEY], [NEW_KEY, OLD_KEY], True, id="rotating-to-rotating"),
    ],
)
def test_key_rotation(signer_keys: list[bytes], verifier_keys: list[bytes], accepted: bool) -> None:
    data = Codec(GROUP, signer_keys).encode(_message())
    verifier = Codec(GROUP, verifier_keys)
    if accepted:
        assert verifier.decode(data) == _message()
    else:
        assert _rejected(verifier, data) is RejectReason.BAD_SIGNATURE


def test_rotating_codec_signs_with_the_first_key() -> None:
    data = Codec(GROUP, [NEW_KEY, OLD_KEY]).encode(_message())
    assert data == Codec(GROUP, [NEW_KEY]).encode(_message())
    assert data != Codec(GROUP, [OLD_KEY]).encode(_message())


def test_rejection_carries_reason_and_detail() -> None:
    with pytest.raises(MessageRejected) as caught:
        UNSIGNED.decode(_raw(_valid_object(v=9)))
    assert caught.value.reason is RejectReason.VERSION
    assert caught.value.detail == "9"
    assert str(caught.value) == "version: 9"


# ---- construction -------------------------------------------------------------------------------

BAD_MESSAGES = [
    pytest.param({"kind": "hb"}, id="kind-as-string"),
    pytest.param({"group": ""}, id="empty-group"),
    pytest.param({"group": "g" * 65}, id="long-group"),
    pytest.param({"sender": ""}, id="empty-sender"),
    pytest.param({"sender": None}, id="null-sender"),
    pytest.param({"term": -1}, id="negative-term"),
    pytest.param({"term": 2**63}, id="huge-term"),
    pytest.param({"term": True}, id="bool-term"),
    pytest.param({"term": 1.0}, id="float-term"),
    pytest.param({"seq": "1"}, id="string-seq"),
    pytest.param({"seq": -5}, id="negative-seq"),
    pytest.param({"kind": Kind.VOTE}, id="vote-without-target"),
    pytest.param({"kind": Kind.HANDOVER, "target": ""}, id="handover-empty-target"),
    pytest.param({"kind": Kind.HEARTBEAT, "target": "b"}, id="heartbeat-with-target"),
    pytest.param({"kind": Kind.LEAVE, "url": "http://h/"}, id="leave-with-url"),
    pytest.param({"url": ""}, id="empty-url"),
    pytest.param({"url": "u" * 513}, id="long-url"),
    pytest.param({"url": 80}, id="int-url"),
]


@pytest.mark.parametrize("overrides", BAD_MESSAGES)
def test_invalid_message_construction_raises_value_error(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _message(**overrides)


def test_message_is_frozen_and_compares_by_value() -> None:
    assert _message() == _message()
    assert _message(seq=2) != _message(seq=3)
    with pytest.raises(AttributeError):
        _message().term = 9  # type: ignore[misc]


# ---- properties -------------------------------------------------------------------------------


@FAST
@given(data=st.binary(max_size=MAX_MESSAGE_BYTES + 16))
@pytest.mark.parametrize("codec", [UNSIGNED, SIGNED], ids=["unsigned", "signed"])
def test_property_decode_of_arbitrary_bytes_only_raises_message_rejected(
    codec: Codec, data: bytes
) -> None:
    try:
        message = codec.decode(data)
    except MessageRejected:
        return
    # Random bytes may, very rarely, be a valid unsigned message; then it must be one.
    assert isinstance(message, Message)
    assert codec.decode(codec.encode(message)) == message


@FAST
@given(data=st.binary(max_size=200))
def test_property_decode_of_json_looking_bytes_only_raises_message_rejected(data: bytes) -> None:
    try:
        message = UNSIGNED.decode(b"{" + data)
    except MessageRejected:
        return
    assert UNSIGNED.decode(UNSIGNED.encode(message)) == message


def _text(max_bytes: int) -> st.SearchStrategy[str]:
    # Printable text within a byte limit: any printable characters (up to 4 bytes each), or
    # ASCII up to the whole limit, quotes and backslashes included (JSON escapes those).
    unicode = st.characters(categories=["L", "M", "N", "P", "S"])
    return st.text(unicode, min_size=1, max_size=max_bytes // 4) | st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=max_bytes
    )


_ids = _text(64)
_numbers = st.integers(min_value=0, max_value=_MAX_INT)


@st.composite
def valid_messages(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(list(Kind)))
    target = draw(_ids) if kind in TARGETED_KINDS else None
    url = None
    if kind in (Kind.HEARTBEAT, Kind.PRESENCE):
        url = draw(st.none() | _text(512))
    message = Message(
        kind=kind,
        group=GROUP,
        sender=draw(_ids),
        term=draw(_numbers),
        seq=draw(_numbers),
        target=target,
        url=url,
    )
    # Limits count UTF-8 bytes, so every message that can be built fits on the wire.
    assert len(SIGNED.encode(message)) <= MAX_MESSAGE_BYTES
    return message


@FAST
@given(message=valid_messages(), position=st.integers(min_value=0), byte=st.integers(0, 255))
def test_property_no_single_byte_change_of_a_signed_message_is_accepted(
    message: Message, position: int, byte: int
) -> None:
    data = bytearray(SIGNED.encode(message))
    position %= len(data)
    if data[position] == byte:
        return  # not a change
    data[position] = byte
    with pytest.raises(MessageRejected):
        SIGNED.decode(bytes(data))


@FAST
@given(message=valid_messages())
def test_property_valid_messages_round_trip_signed_and_unsigned(message: Message) -> None:
    for codec in (UNSIGNED, SIGNED):
        assert codec.decode(codec.encode(message)) == message


_KEYS = ["v", "k", "g", "n", "t", "s", "c", "u"]
_json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(),
    st.text(max_size=70),
    st.sampled_from([k.value for k in Kind]),
    st.just(GROUP),
    st.just(PROTOCOL_VERSION),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
_plausible = st.fixed_dictionaries(
    {
        "v": st.just(PROTOCOL_VERSION) | _json_values,
        "k": st.sampled_from([k.value for k in Kind]) | _json_values,
        "g": st.just(GROUP) | _json_values,
        "n": st.text(min_size=1, max_size=64) | _json_values,
        "t": _numbers | _json_values,
        "s": _numbers | _json_values,
    },
    optional={"c": st.text(min_size=1, max_size=64) | _json_values, "u": _json_values},
)
_objects = st.one_of(st.dictionaries(st.sampled_from(_KEYS), _json_values), _plausible)


@FAST
@given(obj=_objects)
def test_property_random_objects_decode_faithfully_or_are_rejected(obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    for codec, wire in ((UNSIGNED, data), (SIGNED, _sign(data))):
        try:
            message = codec.decode(wire)
        except MessageRejected:
            continue
        # Accepted: every field must be what was sent, with the exact types the protocol allows.
        assert set(obj) <= set(_KEYS)
        assert type(obj["v"]) is int and obj["v"] == PROTOCOL_VERSION
        assert (message.kind.value, message.group, message.sender) == (obj["k"], obj["g"], obj["n"])
        assert type(obj["t"]) is int and message.term == obj["t"] >= 0
        assert type(obj["s"]) is int and message.seq == obj["s"] >= 0
        assert (message.target, message.url) == (obj.get("c"), obj.get("u"))
        assert codec.decode(codec.encode(message)) == message


_not_a_kind = st.one_of(st.text(), st.integers(), st.none())
_bad_id = st.one_of(st.just(""), st.text(min_size=65, max_size=80), st.integers(), st.none())
_bad_number = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=_MAX_INT + 1),
    st.booleans(),
    st.floats(),
    st.text(),
    st.none(),
)


@st.composite
def invalid_message_fields(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(list(Kind)))
    fields: dict[str, Any] = {
        "kind": kind,
        "group": GROUP,
        "sender": "a",
        "term": 1,
        "seq": 1,
        "target": "b" if kind in TARGETED_KINDS else None,
        "url": None,
    }
    broken = draw(st.sampled_from(["kind", "group", "sender", "term", "seq", "target", "url"]))
    if broken == "kind":
        fields["kind"] = draw(_not_a_kind)
    elif broken in ("group", "sender"):
        fields[broken] = draw(_bad_id)
    elif broken in ("term", "seq"):
        fields[broken] = draw(_bad_number)
    elif broken == "target":
        if kind in TARGETED_KINDS:
            fields["target"] = draw(_bad_id)
        else:
            fields["target"] = draw(st.text(max_size=10) | st.integers())
    elif kind in (Kind.HEARTBEAT, Kind.PRESENCE):
        fields["url"] = draw(
            st.one_of(st.just(""), st.text(min_size=513, max_size=600), st.integers())
        )
    else:
        fields["url"] = draw(st.text(max_size=20) | st.integers())
    return fields


@FAST
@given(fields=invalid_message_fields())
def test_property_invalid_message_construction_raises_value_error(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Message(**fields)


# ---- two signatures (key rotation) ------------------------------------------------------------

ROTATING = Codec(GROUP, [NEW_KEY, OLD_KEY], signers=2)


def test_rotating_codec_signs_under_both_keys_so_either_side_accepts() -> None:
    data = ROTATING.encode(_message())
    body = UNSIGNED.encode(_message())
    assert data == _sign(body, NEW_KEY)[:64] + _sign(body, OLD_KEY)
    for verifier in (Codec(GROUP, [OLD_KEY]), Codec(GROUP, [NEW_KEY]), ROTATING):
        assert verifier.decode(data) == _message()
    # And it accepts what either side sends.
    for signer in (Codec(GROUP, [OLD_KEY]), Codec(GROUP, [NEW_KEY])):
        assert ROTATING.decode(signer.encode(_message())) == _message()
    assert _rejected(Codec(GROUP, [KEY]), data) is RejectReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("keys", "signers"),
    [([KEY], 0), ([KEY], 3), ([KEY], 2), ([NEW_KEY, OLD_KEY, KEY], 3)],
    ids=["zero", "three", "more-than-keys", "three-keys"],
)
def test_codec_refuses_a_bad_number_of_signers(keys: list[bytes], signers: int) -> None:
    with pytest.raises(ValueError, match="signers"):
        Codec(GROUP, keys, signers=signers)


def test_worst_case_message_with_two_signatures_fits() -> None:
    worst = _message(sender='"' * 64, url="http://h/" + '"' * 503)
    assert len(ROTATING.encode(worst)) <= MAX_MESSAGE_BYTES
    assert ROTATING.decode(ROTATING.encode(worst)) == worst


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d[:64] + d[64:128].upper() + d[128:], id="second-mac-upper-hex"),
        pytest.param(lambda d: d[:64] + d[:64] + d[:64] + d[128:], id="three-signatures"),
        pytest.param(lambda d: b"0" * 64 + b"1" * 64 + d[128:], id="two-wrong"),
        pytest.param(lambda d: d[:127] + d[128:], id="second-mac-short"),
    ],
)
def test_rotating_codec_rejects_bad_signature_pairs(mutate: Any) -> None:
    assert _rejected(ROTATING, mutate(ROTATING.encode(_message()))) is RejectReason.BAD_SIGNATURE


@FAST
@given(message=valid_messages(), position=st.integers(min_value=0), byte=st.integers(0, 255))
def test_property_a_byte_changed_in_a_doubly_signed_message_is_rejected_unless_in_a_signature(
    message: Message, position: int, byte: int
) -> None:
    data = bytearray(ROTATING.encode(message))
    position %= len(data)
    if data[position] == byte:
        return
    data[position] = byte
    for verifier in (ROTATING, Codec(GROUP, [OLD_KEY]), Codec(GROUP, [NEW_KEY])):
        try:
            decoded = verifier.decode(bytes(data))
        except MessageRejected:
            continue
        # The other signature still vouches for the body, which is unchanged.
        assert position < 2 * 64
        assert decoded == message


# ---- fuzzing: random and mutated messages against a reference decoder ------------------------
#
# The reference below is the wire format's specification, written out plainly and separately
# from the codec: a message is accepted exactly when it meets every rule, and then it is the
# message the rules read. The properties feed both the same bytes (valid messages mutated field
# by field, re-serialised, re-encoded, re-signed and damaged byte by byte) and require the same
# answer: the codec may never accept what the specification refuses, nor refuse what it accepts,
# and may raise nothing but MessageRejected.

_HEX64 = re.compile(rb"[0-9a-f]{64}")
_ALLOWED = {"v", "k", "g", "n", "t", "s", "c", "u"}


def _spec_text(value: object, max_bytes: int) -> bool:
    if not isinstance(value, str) or not value.isprintable():
        return False
    try:
        return 0 < len(value.encode("utf-8")) <= max_bytes
    except UnicodeEncodeError:
        return False


def _spec_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice")
    return dict(pairs)


def _spec_no_constant(name: str) -> Any:
    raise ValueError(name)


def reference_decode(keys: list[bytes], data: bytes) -> Message | None:
    """The message ``data`` holds for a group ``GROUP`` with ``keys``, or None if it is not
    one: the specification, independent of the codec."""
    if len(data) > MAX_MESSAGE_BYTES:
        return None
    body = data
    if keys:
        # One or two lowercase hex HMAC-SHA256 signatures, then the body; one must verify.
        if body[:1] == b"{":
            return None
        signatures = [body[:64]]
        body = body[64:]
        if _HEX64.fullmatch(body[:64]):
            signatures.append(body[:64])
            body = body[64:]
        good = {hmac.new(key, body, hashlib.sha256).hexdigest().encode() for key in keys}
        if not good.intersection(signatures):
            return None
    elif body[:1] != b"{":
        return None
    try:
        text = body.decode("utf-8")  # UTF-8 only: no other encoding, no byte order mark
        obj = json.loads(text, object_pairs_hook=_spec_pairs, parse_constant=_spec_no_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not set(obj) <= _ALLOWED:
        return None
    if not {"v", "k", "g", "n", "t", "s"} <= set(obj):
        return None
    if type(obj["v"]) is not int or obj["v"] != PROTOCOL_VERSION:
        return None
    kinds = {kind.value: kind for kind in Kind}
    if not isinstance(obj["k"], str) or obj["k"] not in kinds:
        return None
    kind = kinds[obj["k"]]
    if obj["g"] != GROUP or type(obj["g"]) is not str:
        return None
    if not _spec_text(obj["n"], 64):
        return None
    for number in (obj["t"], obj["s"]):
        if type(number) is not int or not 0 <= number <= _MAX_INT:
            return None
    targeted = kind in TARGETED_KINDS
    if targeted != ("c" in obj) or (targeted and not _spec_text(obj["c"], 64)):
        return None
    if "u" in obj and (
        kind not in (Kind.HEARTBEAT, Kind.PRESENCE) or not _spec_text(obj["u"], 512)
    ):
        return None
    return Message(kind, obj["g"], obj["n"], obj["t"], obj["s"], obj.get("c"), obj.get("u"))


# Raw JSON for a field's value: anything a hostile sender might write there.
_HOSTILE_VALUES = [
    "NaN", "Infinity", "-Infinity", "1e400", "-0", "0.0", "1.0", "1E2", "-1", "00", "01",
    str(2**63 - 1), str(2**63), str(2**64), "9" * 300, "-" + "9" * 300,
    "true", "false", "null", "[]", "{}", "[1]", '{"v":1}', '{"a":1,"a":2}', "[" * 50 + "]" * 50,
    '""', '" "', '"\\u0000"', '"\\n"', '"\\t"', '"\\u007f"', '"\\ud800"', '"\\udfff"',
    '"\\ud83d\\ude00"', '"\\u2028"', '"\\u200b"', '"\\ufeff"', '"\\u00e9"', '"é"', '"😀"',
    '"hb"', '"vg"', '"ho"', '"HB"', '" hb"', f'"{GROUP}"', f'"{GROUP.upper()}"', f'"{GROUP} "',
    f'"{GROUP}\\u0000"', '"node-b"', '"x' + "y" * 64 + '"', '"http://h/"',
    '"' + "é" * 32 + '"', '"' + "é" * 33 + '"',
]  # fmt: skip
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
)
_json_value = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
_value_fragment = st.sampled_from(_HOSTILE_VALUES) | _json_value.map(
    lambda v: json.dumps(v, allow_nan=True)
)


def _escaped_key(key: str) -> str:
    return '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"'


def _wire_object(message: Message) -> dict[str, Any]:
    return json.loads(UNSIGNED.encode(message))  # type: ignore[no-any-return]


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A valid message's JSON, mutated field by field, re-serialised in many legal and illegal
    ways, and encoded (mostly as UTF-8)."""
    obj = _wire_object(draw(valid_messages()))
    ascii_only = draw(st.booleans())
    pairs: list[tuple[str, str]] = [
        (json.dumps(k), json.dumps(v, ensure_ascii=ascii_only)) for k, v in obj.items()
    ]
    for _ in range(draw(st.integers(0, 3))):
        operation = draw(st.sampled_from(["replace", "delete", "add", "duplicate", "escape-key"]))
        index = draw(st.integers(0, max(0, len(pairs) - 1)))
        if operation == "replace" and pairs:
            pairs[index] = (pairs[index][0], draw(_value_fragment))
        elif operation == "delete" and pairs:
            del pairs[index]
        elif operation == "add":
            key = draw(st.sampled_from([*sorted(_ALLOWED), "x", "V", "kind", ""]) | st.text())
            pairs.insert(index, (json.dumps(key), draw(_value_fragment)))
        elif operation == "duplicate" and pairs:
            key = pairs[index][0]
            value = draw(st.just(pairs[index][1]) | _value_fragment)
            pairs.insert(draw(st.integers(0, len(pairs))), (key, value))
        elif operation == "escape-key" and pairs:
            key = json.loads(pairs[index][0])
            pairs[index] = (_escaped_key(key), pairs[index][1])
    pairs = draw(st.permutations(pairs))
    comma = draw(st.sampled_from([",", ", ", " ,\n"]))
    colon = draw(st.sampled_from([":", ": ", " :\t"]))
    text = "{" + comma.join(f"{k}{colon}{v}" for k, v in pairs) + "}"
    text = draw(st.sampled_from(["", " "])) + text + draw(st.sampled_from(["", " ", "\n", "x"]))
    encoding = draw(
        st.sampled_from(["utf-8"] * 8 + ["utf-8-sig", "utf-16-le", "utf-16-be", "utf-32"])
    )
    return text.encode(encoding, errors="surrogatepass")


_SIGNINGS = ["new", "old", "both", "both-reversed", "wrong", "none", "new+junk", "junk+new"]


def _signed(body: bytes, how: str) -> bytes:
    def mac(key: bytes) -> bytes:
        return hmac.new(key, body, hashlib.sha256).hexdigest().encode()

    return {
        "new": mac(NEW_KEY),
        "old": mac(OLD_KEY),
        "both": mac(NEW_KEY) + mac(OLD_KEY),
        "both-reversed": mac(OLD_KEY) + mac(NEW_KEY),
        "wrong": mac(KEY),
        "none": b"",
        "new+junk": mac(NEW_KEY) + b"0" * 64,
        "junk+new": b"f" * 64 + mac(NEW_KEY),
    }[how] + body


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with, sometimes, a few bytes changed, inserted, deleted, or cut off."""
    out = bytearray(data)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        if not out:
            break
        at = draw(st.integers(0, len(out) - 1))
        operation = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        if operation == "set":
            out[at] = draw(st.integers(0, 255))
        elif operation == "insert":
            out.insert(at, draw(st.integers(0, 255)))
        elif operation == "delete":
            del out[at]
        else:
            del out[at:]
    return bytes(out)


# The codecs under test, with the keys the reference is given for each.
FUZZED_CODECS = [
    pytest.param(UNSIGNED, [], id="unsigned"),
    pytest.param(Codec(GROUP, [NEW_KEY]), [NEW_KEY], id="signed"),
    pytest.param(Codec(GROUP, [OLD_KEY]), [OLD_KEY], id="signed-old-key"),
    pytest.param(ROTATING, [NEW_KEY, OLD_KEY], id="rotating"),
]


def _decode(codec: Codec, data: bytes) -> Message | None:
    try:
        return codec.decode(data)
    except MessageRejected as rejected:
        assert isinstance(rejected.reason, RejectReason)
        return None


# 300 examples per codec in the default run (a few seconds); a longer hunt:
# FASTAPI_LEADER_FUZZ_EXAMPLES=20000 pytest tests/core/test_messages.py -k specified
FUZZ = settings(FAST, max_examples=int(os.environ.get("FASTAPI_LEADER_FUZZ_EXAMPLES", "300")))


@FUZZ
@given(body=mutated_bodies(), how=st.sampled_from(_SIGNINGS), data=st.data())
@pytest.mark.parametrize(("codec", "keys"), FUZZED_CODECS)
def test_property_mutated_messages_are_decoded_exactly_as_specified(
    codec: Codec, keys: list[bytes], body: bytes, how: str, data: st.DataObject
) -> None:
    wire = body if not keys else _signed(body, how)
    wire = data.draw(damaged(wire), label="wire")
    assert _decode(codec, wire) == reference_decode(keys, wire)


@FAST
@given(message=valid_messages(), how=st.sampled_from(_SIGNINGS))
@pytest.mark.parametrize(("codec", "keys"), FUZZED_CODECS)
def test_property_valid_messages_are_decoded_exactly_as_specified(
    codec: Codec, keys: list[bytes], message: Message, how: str
) -> None:
    body = UNSIGNED.encode(message)
    wire = body if not keys else _signed(body, how)
    expected = reference_decode(keys, wire)
    assert _decode(codec, wire) == expected
    if how == "both" or not keys:  # signed under every key the codecs know
        assert expected == message  # the reference itself reads what the codec writes


@FAST
@given(data=st.binary(max_size=MAX_MESSAGE_BYTES + 16))
@pytest.mark.parametrize(("codec", "keys"), FUZZED_CODECS)
def test_property_random_bytes_are_decoded_exactly_as_specified(
    codec: Codec, keys: list[bytes], data: bytes
) -> None:
    assert _decode(codec, data) == reference_decode(keys, data)


# ---- faults the fuzzing found ----------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-8-sig"])
def test_regression_a_body_not_in_utf8_is_malformed(encoding: str) -> None:
    # json.loads(bytes) guesses the encoding: the same message in UTF-16 or UTF-32 (or with a
    # byte order mark) was accepted, so one message had many wire forms.
    body = json.dumps(_valid_object()).encode(encoding)
    if body[:1] == b"{":
        assert _rejected(UNSIGNED, body) is RejectReason.MALFORMED
    assert _rejected(SIGNED, _sign(body)) is RejectReason.MALFORMED


@pytest.mark.parametrize(
    "body",
    [
        b'{"v":1,"k":"hb","g":"billing","n":"node-a","t":7,"t":99,"s":42}',
        b'{"v":1,"k":"hb","g":"billing","n":"node-a","t":7,"s":42,"n":"node-b"}',
        b'{"v":1,"k":"hb","g":"other","g":"billing","n":"node-a","t":7,"s":42}',
        b'{"v":1,"k":"hb","g":"billing","n":"node-a","t":7,"\\u0074":7,"s":42}',
    ],
    ids=["term", "sender", "group", "escaped-duplicate"],
)
def test_regression_a_repeated_key_is_malformed(body: bytes) -> None:
    # json.loads keeps the last of repeated keys; another parser (or a log reader) may keep the
    # first, and see another message under the same signature.
    assert _rejected(UNSIGNED, body) is RejectReason.MALFORMED
    assert _rejected(SIGNED, _sign(body)) is RejectReason.MALFORMED
