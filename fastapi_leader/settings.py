"""The public configuration: one settings class, read from ``LEADER_*`` variables and ``.env``.

Every duration is in seconds (a float, or a :class:`datetime.timedelta`). The timings are checked
together at construction, because a lease that outlives the election timeout is exactly the
misconfiguration that gives two leaders; the error names the fields and the rule they break.

An invalid setting raises :class:`SettingsError`, whose first line names the environment
variable, the value given and the rule (``LEADER_LEASE='abc' (lease): Input should be a valid
number``): under uvicorn, that is the line printed last, where a reader looks first, instead of
pydantic's traceback with its links (the :class:`pydantic.ValidationError` stays available).
"""

from __future__ import annotations

import inspect
import re
import ssl
import uuid
from collections.abc import Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    BeforeValidator,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from .core import Timing
from .messages import url_problem
from .redis_url import is_tls, parse_broker_url, redact_url

# The protocol's defaults live in the core's Timing; the settings only name them.
_DEFAULTS = Timing()

__all__ = ["LeaderSettings", "SettingsError"]

# Names travel in every message and in channel names: keep them short and unambiguous.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def _seconds(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


Seconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0, allow_inf_nan=False)]


def new_node_id() -> str:
    """A fresh random node id: 16 hex digits."""
    return uuid.uuid4().hex[:16]


# The app-loop watchdog reads the loop four times a second: a limit under a second would hand
# the leadership over on a stall it cannot measure to better than a quarter of it.
MIN_LOOP_STALL_LIMIT = 1.0


# The TLS settings, and the redis-py connection arguments they become.
_REDIS_PY_TLS_OPTIONS = {
    "ssl_ca_certs": "ssl_ca_certs",
    "ssl_certfile": "ssl_certfile",
    "ssl_keyfile": "ssl_keyfile",
    "ssl_keyfile_password": "ssl_password",
    "ssl_cert_reqs": "ssl_cert_reqs",
    "ssl_check_hostname": "ssl_check_hostname",
}
_TLS_FIELDS = tuple(_REDIS_PY_TLS_OPTIONS)


def _redis_py_reads_encrypted_keys() -> bool:
    from redis.asyncio.connection import SSLConnection

    return "ssl_password" in inspect.signature(SSLConnection.__init__).parameters


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


ENV_PREFIX = "LEADER_"

# Values never repeated in an error message.
_SECRET_FIELDS = frozenset(
    {"secret", "previous_secret", "ssl_keyfile_password", "sentinel_password"}
)


class SettingsError(ValueError):
    """A setting is invalid. The first line of the message names the environment variable, the
    value given and the rule it breaks (one line per invalid setting follows, if several).

    ``validation_error`` is pydantic's own :class:`~pydantic.ValidationError`."""

    def __init__(self, message: str, validation_error: ValidationError) -> None:
        super().__init__(message)
        self.validation_error = validation_error

    def errors(self) -> list[Any]:
        """pydantic's error list (``validation_error.errors()``)."""
        return list(self.validation_error.errors())


def _shown(field: str, value: Any) -> str:
    """A given value as an error message may show it: secrets hidden, passwords masked."""
    if field in _SECRET_FIELDS:
        return "'***'"
    if isinstance(value, SecretStr):
        return "'***'"
    if field == "redis_url" and isinstance(value, str):
        value = redact_url(value)
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}...{text[-12:]}"


def _first_field(message: str, fields: list[str]) -> str | None:
    """The field a model-wide rule's message names first."""
    found = [
        (match.start(), name)
        for name in fields
        if (match := re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message))
    ]
    return min(found)[1] if found else None


def _settings_error(exc: ValidationError, given: Mapping[str, Any]) -> SettingsError:
    fields = list(LeaderSettings.model_fields)
    lines = []
    for error in exc.errors():
        rule = str(error["msg"]).removeprefix("Value error, ")
        loc = error.get("loc") or ()
        field = str(loc[0]) if loc else _first_field(rule, fields)
        if field is None:
            lines.append(rule)
            continue
        raw = error.get("input")
        if not loc:
            raw = raw.get(field) if isinstance(raw, dict) else None
        env = f"{ENV_PREFIX}{field.upper()}"
        value = "" if raw is None else f"={_shown(field, raw)}"
        if field in given:
            lines.append(f"{field}{value} ({env}): {rule}")
        else:
            lines.append(f"{env}{value} ({field}): {rule}")
    if len(lines) > 1:
        lines.append(f"({len(lines)} invalid settings)")
    return SettingsError("\n".join(lines), exc)


class LeaderSettings(BaseSettings):
    """Configuration of one node of an election group.

    Read from the environment (prefix ``LEADER_``, e.g. ``LEADER_GROUP=billing``) and from a
    ``.env`` file in the working directory; keyword arguments override both.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        extra="ignore",
        frozen=True,
        # A rejected redis_url or secret must not be echoed into logs with the error.
        hide_input_in_errors=True,
        use_attribute_docstrings=True,
    )

    FAST_PROFILE: ClassVar[Mapping[str, float]] = MappingProxyType(
        {
            "heartbeat_interval": 0.05,
            "lease": 0.15,
            "election_timeout_min": 0.2,
            "election_timeout_max": 0.25,
            "member_expiry": 0.5,
        }
    )
    """The timings of :meth:`fast`: crash failover in about a quarter of a second.

    Half the default heartbeat, and every rule at its tightest: ``lease`` = 3 heartbeats (two
    renewals may be lost), ``election_timeout_min`` = ``lease`` + one heartbeat, and a narrow
    random spread (50 ms; contested rounds widen it by themselves) so that a failover lands
    between 1.0 and 1.25 x ``election_timeout_min`` plus one election round. The price: twice
    the leader's Redis commands (20/s) and of every follower's heartbeats to read, and a pause
    of the leader's process beyond about 100 ms (a long GC, a C call holding the GIL) costs the
    leadership; stalls of the app's event loop do not. Meant for a LAN or one host, and for
    hosts with CPU to spare (100 nodes of it take most of two cores); keep the defaults across
    data centres."""

    ECONOMY_PROFILE: ClassVar[Mapping[str, float]] = MappingProxyType(
        {
            "heartbeat_interval": 3.0,
            "lease": 12.0,
            "election_timeout_min": 15.0,
            "election_timeout_max": 20.0,
            "member_expiry": 36.0,
        }
    )
    """The timings of :meth:`economy`: the fewest Redis commands, for a Redis billed per
    command (Upstash and others), at the price of a crash failover of 15 to 20 seconds.

    The default's proportions at 30 x the heartbeat: ``lease`` = 4 heartbeats, the election
    timeout from ``lease`` + one heartbeat, and followers' presence every 12 s (three per
    ``member_expiry``). A group of 3 sends about 0.5 commands a second (the leader's renewal
    every 3 s and two presences every 12 s); a graceful handover stays as fast as at the
    defaults, since it waits on no timeout. The README's Tuning section has commands per day
    for each profile."""

    def __init__(self, **values: Any) -> None:
        """Read the settings; keyword arguments win over the environment and ``.env``.

        Raises:
            SettingsError: a setting is invalid (the message's first line says which, with the
                value given and the rule).
        """
        try:
            super().__init__(**values)
        except ValidationError as exc:
            # The pydantic error and its traceback add 50 lines and name fields, not the
            # variables a deployment sets: say it in one line (the error is kept on it).
            raise _settings_error(exc, values) from None

    redis_url: str = Field(default="redis://localhost:6379/0", repr=False)
    """Redis (or Valkey) to use as the broker: ``redis://``, ``rediss://`` (TLS) or ``unix://``
    for one server; ``redis+cluster://host:port[,host:port...]`` for Redis Cluster;
    ``redis+sentinel://host:port[,host:port...]/service_name[/db]`` for Sentinel (and their
    ``rediss+`` TLS forms). ``redis://user:password@host:6379/0`` for ACL users. The password is
    never logged. ``memory://`` elects among the nodes of this one process (development and
    tests)."""

    sentinel_password: SecretStr | None = None
    """The sentinels' own password (their ``requirepass``), for ``redis+sentinel://`` URLs whose
    sentinels require one; the URL's user and password are those of the primary."""

    group: str = "default"
    """The service's name. Nodes of different groups on one Redis never see each other."""

    channel_prefix: str = "fastapi-leader"
    """Prefix of every channel and key this library uses on Redis."""

    node_id: str | None = None
    """This node's id, unique in the group. Default (unset): a fresh random id drawn when the
    election starts, in the process that runs it, so that every worker forked from one parent
    (``gunicorn --preload``, ``multiprocessing``) is a node of its own. Set it only to a value
    unique per process (not ``$HOSTNAME`` with ``--workers 2``): two live processes with one
    id are detected and reported, and the later one does not stand for election."""

    heartbeat_interval: Seconds = _DEFAULTS.heartbeat_interval
    """How often the leader renews its lease and broadcasts a heartbeat. 100 ms keeps crash
    failover under a second while costing one Redis command per beat."""

    lease: Seconds = _DEFAULTS.lease
    """How long a renewal keeps the leadership valid, counted from when the renewal was sent.
    Four heartbeats: three renewals can be lost before the leader steps down."""

    election_timeout_min: Seconds = _DEFAULTS.election_timeout_min
    """Shortest silence from the leader after which a follower stands for election. At least
    the lease plus one heartbeat, so the old lease has ended before anyone can win."""

    election_timeout_max: Seconds = _DEFAULTS.election_timeout_max
    """Longest such silence; each wait draws a random timeout in [min, max] so that followers do
    not all stand at once. In a group of N > 4 members the spread above the minimum is N/4
    times wider, so that the earliest of the N draws still falls in [min, max] while the others
    stay clear of its round; after a node stood without a leader coming of it (a contested or
    overloaded round), its spread doubles, up to 4 x, until a leader is heard."""

    member_expiry: Seconds = _DEFAULTS.member_expiry
    """A node not heard from for this long leaves the member table (and the vote count).
    Followers announce themselves three times per expiry; in a group larger than
    ``member_expiry / 3 / heartbeat_interval`` members they announce themselves once every
    *group size* heartbeats instead (so the group's traffic stays flat as it grows), and the
    expiry grows to three such intervals."""

    secret: SecretStr | None = None
    """Shared key; when set, every message is signed with HMAC-SHA256 and unsigned, forged or
    replayed messages are dropped."""

    previous_secret: SecretStr | None = None
    """The key being replaced while ``secret`` is rotated. While it is set, this node accepts
    messages signed with either key and signs its own with both, so it and the nodes still on
    the old key hear each other. Rotate in two rolling deployments: set ``secret`` to the new
    key and ``previous_secret`` to the old one everywhere; once every node runs that, remove
    ``previous_secret``."""

    ssl_ca_certs: FilePath | None = None
    """PEM file of the certificate authorities that may sign the Redis server's certificate
    (``rediss://`` only). Default: the system's trusted CAs."""

    ssl_certfile: FilePath | None = None
    """PEM file of this node's client certificate, for servers that require one
    (``tls-auth-clients yes``); it may hold the private key too (``rediss://`` only)."""

    ssl_keyfile: FilePath | None = None
    """PEM file of the client certificate's private key, when not in ``ssl_certfile``."""

    ssl_keyfile_password: SecretStr | None = None
    """Passphrase of an encrypted private key."""

    ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    """Whether the server's certificate must be valid: ``none`` encrypts without knowing who
    answers, so anyone on the path can read and forge the group's traffic."""

    ssl_check_hostname: bool = True
    """Whether the server's certificate must name the host of ``redis_url`` (a DNS name or an
    IP address in its subject alternative names). Ignored when ``ssl_cert_reqs`` is ``none``."""

    loop_stall_limit: Seconds = 10.0
    """How long the application's event loop may go without running before this node gives
    up the leadership. The election runs on a thread of its own, so shorter stalls (a sync
    call in an ``async def`` route, a big JSON encode) never cost the lead; a loop stuck this
    long means the leader's work is not getting done, so the node hands over and stands again
    only once its loop has run smoothly for 5 s (or this limit, if shorter). Larger: a slow
    app keeps the lead longer; smaller: a hung app loses it sooner. At least 1 s."""

    advertise_url: str | None = None
    """A URL at which other nodes (and clients redirected from followers) can reach this node."""

    @field_validator("group", "channel_prefix", "node_id")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.fullmatch(value):
            raise ValueError(
                "must be 1 to 64 characters of letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        parse_broker_url(value)  # its ValueError is one line, and never quotes the password
        return value

    @field_validator("advertise_url")
    @classmethod
    def _check_advertise_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http:// or https:// URL")
        problem = url_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("secret", "previous_secret")
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
        if self.loop_stall_limit < MIN_LOOP_STALL_LIMIT:
            raise ValueError(
                f"loop_stall_limit ({self.loop_stall_limit}) must be at least "
                f"{MIN_LOOP_STALL_LIMIT:g} s: the app's loop is read four times a second"
            )
        if self.member_expiry < 2 * hb:
            raise ValueError(
                f"member_expiry ({self.member_expiry}) must be at least 2 x "
                f"heartbeat_interval ({hb})"
            )
        return self

    @model_validator(mode="after")
    def _check_previous_secret(self) -> LeaderSettings:
        previous = self.previous_secret
        if previous is None:
            return self
        if self.secret is None:
            raise ValueError("previous_secret is set but secret is not: set the new key as secret")
        if previous.get_secret_value() == self.secret.get_secret_value():
            raise ValueError(
                "previous_secret must differ from secret: it is the old key, accepted only "
                "while the group changes over to the new one"
            )
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> LeaderSettings:
        chosen = [name for name in _TLS_FIELDS if name in self.model_fields_set]
        if not chosen:
            return self
        if not is_tls(self.redis_url):
            raise ValueError(
                f"{', '.join(chosen)} only apply to TLS connections: redis_url must be rediss:// "
                "(or rediss+cluster://, rediss+sentinel://)"
            )
        in_url = set(parse_qs(urlsplit(self.redis_url).query))
        for name in chosen:
            option = _REDIS_PY_TLS_OPTIONS[name]
            if option in in_url:
                raise ValueError(
                    f"{name} is set both as a setting and as {option}= in redis_url; keep one"
                )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile is set without ssl_certfile, the certificate it signs")
        if self.ssl_keyfile_password is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile_password is set without ssl_certfile")
        if self.ssl_keyfile_password is not None and not _redis_py_reads_encrypted_keys():
            raise ValueError(
                "ssl_keyfile_password needs a newer redis-py (its asyncio client takes "
                "ssl_password since late 2025): upgrade redis, or give a key without a passphrase"
            )
        # Read the files now, so that a wrong file or passphrase fails at startup naming the
        # setting, not at the first connection with an OpenSSL error code.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ssl_ca_certs is not None:
            try:
                context.load_verify_locations(cafile=self.ssl_ca_certs)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"ssl_ca_certs: cannot read CA certificates from {self.ssl_ca_certs} "
                    f"(PEM expected): {_ssl_reason(exc)}"
                ) from None
        if self.ssl_certfile is not None:
            password = self.ssl_keyfile_password
            try:
                context.load_cert_chain(
                    self.ssl_certfile,
                    self.ssl_keyfile,
                    # A callable: OpenSSL then never prompts on the terminal for a passphrase.
                    lambda: "" if password is None else password.get_secret_value(),
                )
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(self._client_certificate_problem(exc)) from None
        return self

    def _client_certificate_problem(self, exc: BaseException) -> str:
        key_field = "ssl_certfile" if self.ssl_keyfile is None else "ssl_keyfile"
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            return f"{key_field}: the private key does not match the certificate in ssl_certfile"
        key_path = self.ssl_keyfile or self.ssl_certfile
        try:
            key_text = b"" if key_path is None else key_path.read_bytes()
        except OSError:
            key_text = b""
        if b"ENCRYPTED" in key_text:
            state = "missing" if self.ssl_keyfile_password is None else "wrong"
            return (
                f"ssl_keyfile_password: {state} passphrase for the encrypted private key "
                f"in {key_field}"
            )
        return (
            f"{key_field}: cannot load the client certificate and its private key from "
            f"ssl_certfile{'' if self.ssl_keyfile is None else ' and ssl_keyfile'} "
            f"(PEM expected): {_ssl_reason(exc)}"
        )

    @property
    def message_keys(self) -> list[bytes]:
        """The HMAC keys for the message codec: ``secret`` first, then ``previous_secret``."""
        return [
            key.get_secret_value().encode()
            for key in (self.secret, self.previous_secret)
            if key is not None
        ]

    @property
    def redis_ssl_options(self) -> dict[str, Any]:
        """The TLS settings as keyword arguments for redis-py's connections; empty unless
        ``redis_url`` is ``rediss://``. (redis-py lets ``ssl_*`` options in the URL's query
        string override these.)"""
        if not is_tls(self.redis_url):
            return {}
        options: dict[str, Any] = {
            # Always passed: redis-py's own default for the hostname check changed over time.
            "ssl_cert_reqs": self.ssl_cert_reqs,
            "ssl_check_hostname": self.ssl_check_hostname and self.ssl_cert_reqs != "none",
        }
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None:
                options[name] = str(path)
        if self.ssl_keyfile_password is not None:
            options["ssl_password"] = self.ssl_keyfile_password.get_secret_value()
        return options

    @classmethod
    def fast(cls, **overrides: Any) -> LeaderSettings:
        """Settings with the :attr:`FAST_PROFILE` timings (50 ms heartbeats, election timeout
        200 to 250 ms): crash failover under 300 ms instead of under a second.

        Other fields come from the environment and ``.env`` as usual, and ``overrides`` (any
        field, a timing included) win over both. The profile's timings win over ``LEADER_*``
        timing variables; to configure it through the environment alone, set them yourself::

            LEADER_HEARTBEAT_INTERVAL=0.05 LEADER_LEASE=0.15 LEADER_ELECTION_TIMEOUT_MIN=0.2
            LEADER_ELECTION_TIMEOUT_MAX=0.25 LEADER_MEMBER_EXPIRY=0.5
        """
        return cls(**{**cls.FAST_PROFILE, **overrides})

    @classmethod
    def economy(cls, **overrides: Any) -> LeaderSettings:
        """Settings with the :attr:`ECONOMY_PROFILE` timings (3 s heartbeats, election timeout
        15 to 20 s): a group of 3 sends 0.5 commands a second instead of 17 at the defaults,
        for a crash failover of 15 to 20 s. Graceful handovers (deploys, ``resign()``) stay a
        few round trips.

        Overrides and the environment work as for :meth:`fast`; through the environment
        alone::

            LEADER_HEARTBEAT_INTERVAL=3 LEADER_LEASE=12 LEADER_ELECTION_TIMEOUT_MIN=15
            LEADER_ELECTION_TIMEOUT_MAX=20 LEADER_MEMBER_EXPIRY=36
        """
        return cls(**{**cls.ECONOMY_PROFILE, **overrides})

    @property
    def redis_url_redacted(self) -> str:
        """``redis_url`` with every password replaced by ``***``, safe to log: the transport's
        own redaction (:func:`fastapi_leader.redis_url.redact_url`)."""
        return redact_url(self.redis_url)
