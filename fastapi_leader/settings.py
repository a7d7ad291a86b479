"""The public configuration: one settings class, read from ``LEADER_*`` variables and ``.env``.

Every duration is in seconds (a float, or a :class:`datetime.timedelta`). The timings are checked
together at construction, because a lease that outlives the election timeout is exactly the
misconfiguration that gives two leaders; the error names the fields and the rule they break.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["LeaderSettings"]

# Names travel in every message and in channel names: keep them short and unambiguous.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def _seconds(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


Seconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0, allow_inf_nan=False)]


def _new_node_id() -> str:
    return uuid.uuid4().hex[:16]


class LeaderSettings(BaseSettings):
    """Configuration of one node of an election group.

    Read from the environment (prefix ``LEADER_``, e.g. ``LEADER_GROUP=billing``) and from a
    ``.env`` file in the working directory; keyword arguments override both.
    """

    model_config = SettingsConfigDict(
        env_prefix="LEADER_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        # A rejected redis_url or secret must not be echoed into logs with the error.
        hide_input_in_errors=True,
        use_attribute_docstrings=True,
    )

    redis_url: str = Field(default="redis://localhost:6379/0", repr=False)
    """Redis (or Valkey) to use as the broker: ``redis://``, ``rediss://`` (TLS) or ``unix://``;
    ``redis://user:password@host:6379/0`` for ACL users. The password is never logged.
    ``memory://`` elects among the nodes of this one process (development and tests)."""

    group: str = "default"
    """The service's name. Nodes of different groups on one Redis never see each other."""

    channel_prefix: str = "fastapi-leader"
    """Prefix of every channel and key this library uses on Redis."""

    node_id: str = Field(default_factory=_new_node_id)
    """This node's id, unique in the group. Default: a fresh random id per process."""

    heartbeat_interval: Seconds = 0.1
    """How often the leader renews its lease and broadcasts a heartbeat. 100 ms keeps crash
    failover under a second while costing one Redis command per beat."""

    lease: Seconds = 0.4
    """How long a renewal keeps the leadership valid, counted from when the renewal was sent.
    Four heartbeats: three renewals can be lost before the leader steps down."""

    election_timeout_min: Seconds = 0.5
    """Shortest silence from the leader after which a follower stands for election. At least
    the lease plus one heartbeat, so the old lease has ended before anyone can win."""

    election_timeout_max: Seconds = 0.75
    """Longest such silence; each wait draws a random timeout in [min, max] so that followers do
    not all stand at once."""

    member_expiry: Seconds = 1.0
    """A node not heard from for this long leaves the member table (and the vote count)."""

    secret: SecretStr | None = None
    """Shared key; when set, every message is signed with HMAC-SHA256 and unsigned, forged or
    replayed messages are dropped."""

    advertise_url: str | None = None
    """A URL at which other nodes (and clients redirected from followers) can reach this node."""

    @field_validator("group", "channel_prefix", "node_id")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                "must be 1 to 64 characters of letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix", "memory"):
            raise ValueError(
                "scheme must be redis://, rediss://, unix:// or memory:// (one process only), "
                f"not {scheme or 'none'}://"
            )
        return value

    @field_validator("advertise_url")
    @classmethod
    def _check_advertise_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http:// or https:// URL")
        if len(value) > 512:
            raise ValueError("must be at most 512 characters")
        return value

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters; use a random key")
        return value

    @model_validator(mode="after")
    def _check_timings(self) -> LeaderSettings:
        hb, lease = self.heartbeat_interval, self.lease
        tmin, tmax = self.election_timeout_min, self.election_timeout_max
        if lease < 2 * hb:
            raise ValueError(
                f"lease ({lease}) must be at least 2 x heartbeat_interval ({hb}), "
                "so that one lost renewal does not end the leadership"
            )
        if lease > tmin - hb + 1e-9:
            raise ValueError(
                f"lease ({lease}) must not exceed election_timeout_min ({tmin}) minus "
                f"heartbeat_interval ({hb}), so that an old leader's lease has ended before "
                "a follower can stand, even one that missed the last heartbeat"
            )
        if tmax < tmin:
            raise ValueError(
                f"election_timeout_max ({tmax}) must not be below election_timeout_min ({tmin})"
            )
        if self.member_expiry < 2 * hb:
            raise ValueError(
                f"member_expiry ({self.member_expiry}) must be at least 2 x "
                f"heartbeat_interval ({hb})"
            )
        return self

    @property
    def redis_url_redacted(self) -> str:
        """``redis_url`` with any password replaced by ``***``, safe to log."""
        parts = urlsplit(self.redis_url)
        if parts.password is None:
            return self.redis_url
        host = parts.netloc.rpartition("@")[2]  # as written: keeps IPv6 brackets and the port
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
