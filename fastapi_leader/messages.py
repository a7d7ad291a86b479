"""Protocol messages and their wire codec: versioned, strict, small, optionally signed.

A message on the wire is one compact JSON object with one-letter keys, in UTF-8. When the group
shares a secret, the object is preceded by the hex HMAC-SHA256 of its exact bytes, so the signature
is checked before any parsing and no canonical re-encoding is needed. During a key rotation it
carries two signatures, one per key, so that nodes holding either key accept it::

    {"v":1,"k":"hb","g":"billing","n":"a1b2","t":7,"s":1732771200000001}
    3f9c...64 hex...e1{"v":1,"k":"hb",...}
    3f9c...64 hex...e17a05...64 hex...c2{"v":1,"k":"hb",...}

Anything that is not exactly a valid message of this group raises :class:`MessageRejected`
with a short reason, which the runtime counts; nothing else ever escapes :meth:`Codec.decode`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_SIGNATURES",
    "PROTOCOL_VERSION",
    "Codec",
    "Kind",
    "Message",
    "MessageRejected",
    "RejectReason",
    "looks_signed",
]

PROTOCOL_VERSION = 1

# The largest legal message is about 1.4 KB (a 512-byte URL of characters JSON escapes to two
# bytes, ids likewise, and two signatures); 2 KiB leaves room without letting a flood of huge
# payloads cost JSON parsing time.
MAX_MESSAGE_BYTES = 2048

_MAC_HEX = 64  # hex digits of an HMAC-SHA256
# One signature per key that signs: two while a key is being rotated, never more.
MAX_SIGNATURES = 2
_HEX_MAC = re.compile(rb"[0-9a-f]{64}")
_MAX_INT = 2**63 - 1  # terms and sequence numbers stay within a signed 64-bit integer
_MAX_ID = 64
MAX_URL_BYTES = 512
"""The longest advertised URL a message carries (UTF-8 bytes); the settings check the same."""


class Kind(str, Enum):
    """What a message says."""

    HEARTBEAT = "hb"
    """The leader's beat, published by the same script that renewed its lease."""
    PRESENCE = "hi"
    """A follower's or candidate's beat: "I am alive and in the group"."""
    VOTE_REQUEST = "rv"
    """A candidate asks for votes in its (freshly allocated) term."""
    VOTE = "vg"
    """A vote granted to ``target`` in ``term``; sent to the candidate's own channel."""
    HANDOVER = "ho"
    """The leader has released its lease and names ``target`` as its successor."""
    LEAVE = "by"
    """The sender leaves the group (graceful shutdown)."""
    RESIGN_REQUEST = "rs"
    """An operator (``fastapi-leader resign``) asks ``target``, the leader of ``term``, to hand
    over; sent to the leader's own channel. The sender is not a member and never becomes one."""


class RejectReason(str, Enum):
    """Why a received message was dropped; used as a counter name."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    VERSION = "version"
    FOREIGN_GROUP = "foreign_group"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    REPLAY = "replay"


class MessageRejected(Exception):
    """Raised by :meth:`Codec.decode` for anything that is not a valid message of the group."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


_TARGETED = frozenset({Kind.VOTE, Kind.HANDOVER, Kind.RESIGN_REQUEST})
_MAY_CARRY_URL = frozenset({Kind.HEARTBEAT, Kind.PRESENCE})


@dataclass(frozen=True, slots=True)
class Message:
    """One protocol message. ``seq`` grows with every message a sender sends, so receivers can
    drop duplicates and replays; ``target`` names the candidate (vote) or successor (handover);
    ``url`` is the sender's advertised URL on heartbeats and presence beats; ``incarnation``
    tells apart the starts of one ``sender`` id (replay protection counts ``seq`` per
    incarnation, so a dead process's sequence can never make a live one's messages look
    replayed). It is omitted on the wire when 0, as nodes before it sent it, so a group can be
    upgraded node by node."""

    kind: Kind
    group: str
    sender: str
    term: int
    seq: int
    target: str | None = None
    url: str | None = None
    incarnation: int = 0

    def __post_init__(self) -> None:
        # Construction and decoding share these checks, so a message we can build we can read.
        problem = _invalid(self)
        if problem:
            raise ValueError(problem)


def _invalid(m: Message) -> str | None:
    if not isinstance(m.kind, Kind):
        return "kind must be a Kind"
    for name, value in (("group", m.group), ("sender", m.sender)):
        if not _is_text(value, _MAX_ID):
            return f"{name} must be printable text of 1 to {_MAX_ID} UTF-8 bytes"
    for name, number in (("term", m.term), ("seq", m.seq), ("incarnation", m.incarnation)):
        if type(number) is not int or not 0 <= number <= _MAX_INT:
            return f"{name} must be an integer in [0, 2**63)"
    if m.kind in _TARGETED:
        if not _is_text(m.target, _MAX_ID):
            return f"{m.kind.name} needs a target of 1 to {_MAX_ID} UTF-8 bytes"
    elif m.target is not None:
        return f"{m.kind.name} carries no target"
    if m.url is not None:
        if m.kind not in _MAY_CARRY_URL:
            return f"{m.kind.name} carries no url"
        problem = url_problem(m.url)
        if problem:
            return problem
    return None


def url_problem(url: object) -> str | None:
    """What the codec has against ``url`` as an advertised URL, or None: the one rule, shared
    with the settings so that a URL they accept never fails at :meth:`Codec.encode`."""
    if not _is_text(url, MAX_URL_BYTES):
        return f"url must be printable text of 1 to {MAX_URL_BYTES} UTF-8 bytes"
    return None


def _is_text(value: object, max_bytes: int) -> bool:
    # Limits count encoded bytes and control characters are refused, because JSON escapes those
    # (one character, six bytes): the worst legal message must still fit in MAX_MESSAGE_BYTES.
    if not isinstance(value, str) or not value.isprintable():
        return False
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # lone surrogates
        return False
    return 0 < size <= max_bytes


_KEYS = {"v", "k", "g", "n", "t", "s", "c", "u", "i"}
_REQUIRED = {"v", "k", "g", "n", "t", "s"}
_KINDS = {kind.value: kind for kind in Kind}


class Codec:
    """Encodes and decodes the messages of one group.

    ``secrets`` are the shared keys: any of them verifies, and the first ``signers`` (1 or 2)
    sign, each message carrying one signature per signing key. With no secret, messages are
    neither signed nor accepted signed.

    A key is rotated with no moment in which two nodes cannot hear each other by signing with
    both keys while the group changes over: every node gets ``[new, old]`` with ``signers=2``
    (its messages then verify under either key, and it accepts either), then ``[new]`` alone.
    """

    def __init__(self, group: str, secrets: Iterable[bytes] = (), *, signers: int = 1) -> None:
        self.group = group
        self._keys = tuple(secrets)
        if not 1 <= signers <= MAX_SIGNATURES:
            raise ValueError(f"signers must be 1 to {MAX_SIGNATURES}, got {signers!r}")
        if self._keys and signers > len(self._keys):
            raise ValueError(f"signers ({signers}) exceeds the number of secrets")
        self._signing_keys = self._keys[:signers]

    @property
    def signed(self) -> bool:
        """Whether messages are signed and signatures required."""
        return bool(self._keys)

    def encode(self, message: Message) -> bytes:
        """The wire bytes of ``message``."""
        obj: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "k": message.kind.value,
            "g": message.group,
            "n": message.sender,
            "t": message.term,
            "s": message.seq,
        }
        if message.target is not None:
            obj["c"] = message.target
        if message.url is not None:
            obj["u"] = message.url
        if message.incarnation:
            obj["i"] = message.incarnation
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        return b"".join(_mac(key, body) for key in self._signing_keys) + body

    def decode(self, data: bytes) -> Message:
        """The message in ``data``, or :class:`MessageRejected` saying why not."""
        if not isinstance(data, (bytes, bytearray)):
            raise MessageRejected(RejectReason.MALFORMED, "not bytes")
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageRejected(RejectReason.OVERSIZED, f"{len(data)} bytes")
        body = bytes(data)
        if self._keys:
            if body[:1] == b"{":
                raise MessageRejected(RejectReason.UNSIGNED)
            # The first 64 bytes are a signature, good or bad; a second one follows only if
            # the next 64 bytes are hex too (a JSON object cannot start with a hex digit).
            macs = [body[:_MAC_HEX]]
            body = body[_MAC_HEX:]
            if _HEX_MAC.match(body):
                macs.append(body[:_MAC_HEX])
                body = body[_MAC_HEX:]
            expected = [_mac(key, body) for key in self._keys]
            # Every comparison is made, so timing does not tell which signature or key failed.
            matches = [hmac.compare_digest(mac, good) for mac in macs for good in expected]
            if not any(matches):
                raise MessageRejected(RejectReason.BAD_SIGNATURE)
        elif body[:1] != b"{":
            raise MessageRejected(RejectReason.MALFORMED, "not a JSON object (signed?)")
        try:
            # Decoded here, strictly: json.loads would also take UTF-16 and UTF-32 (and a byte
            # order mark), and so accept other bytes for the same message.
            text = body.decode("utf-8")
            obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise MessageRejected(RejectReason.MALFORMED, "not JSON") from None
        return self._from_object(obj)

    def _from_object(self, obj: Any) -> Message:
        if not isinstance(obj, dict):
            raise MessageRejected(RejectReason.MALFORMED, "not an object")
        keys = set(obj)
        if not keys <= _KEYS or not keys >= _REQUIRED:
            raise MessageRejected(RejectReason.MALFORMED, "unexpected or missing fields")
        version = obj["v"]
        if type(version) is not int:
            raise MessageRejected(RejectReason.MALFORMED, "version is not an integer")
        if version != PROTOCOL_VERSION:
            raise MessageRejected(RejectReason.VERSION, str(version)[:20])
        kind = _KINDS.get(obj["k"]) if isinstance(obj["k"], str) else None
        if kind is None:
            raise MessageRejected(RejectReason.MALFORMED, "unknown kind")
        if not isinstance(obj["g"], str) or obj.get("c", "") is None or obj.get("u", "") is None:
            raise MessageRejected(RejectReason.MALFORMED, "wrong field types")
        if obj["g"] != self.group:
            raise MessageRejected(RejectReason.FOREIGN_GROUP)
        try:
            return Message(
                kind=kind,
                group=obj["g"],
                sender=obj["n"],
                term=obj["t"],
                seq=obj["s"],
                target=obj.get("c"),
                url=obj.get("u"),
                incarnation=obj.get("i", 0),
            )
        except ValueError as exc:
            raise MessageRejected(RejectReason.MALFORMED, str(exc)) from None


def looks_signed(data: bytes) -> bool:
    """Whether ``data`` carries a signature, checked or not: it starts with one's hex digits.
    Tells an observer without the key (``fastapi-leader status``) that the group signs."""
    return _HEX_MAC.match(data) is not None


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key is read differently by different parsers (first or last wins): refuse it.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
