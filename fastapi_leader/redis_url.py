"""Broker URLs: which Redis topology a ``redis_url`` names, and the one way to redact it.

Accepted forms (the ``rediss`` variants use TLS)::

    redis://[user:password@]host[:port][/db][?options]       one server (or a managed primary)
    unix://[user:password@]/path/to/socket[?db=N]             one server on a Unix socket
    redis+cluster://[user:password@]host:port[,host:port...][?options]       Redis Cluster
    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db][?options]
    memory://                                                 this process only (tests)

The user and password of a cluster or sentinel URL are those of the data nodes (the
primaries); the sentinels' own password, if they have one, is a setting of its own
(``sentinel_password``). Explicit schemes let a plain ``redis://`` that reaches a cluster node or a
sentinel fail at start with a message that names the right one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote

__all__ = ["SCHEMES", "BrokerURL", "is_tls", "parse_broker_url", "redact_url"]

Topology = Literal["standalone", "cluster", "sentinel", "memory"]

# Scheme -> (topology, TLS). One table: the settings' check, the transport and the docs read it.
SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "memory": ("memory", False),
}

# Query options whose value is a secret (redis-py reads ``password=`` from the query string).
_SECRET_OPTION = re.compile(r"([?&](?:password|sentinel_password)=)[^&]*", re.IGNORECASE)
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/,]+)(?::(\d{1,5}))?$")


def redact_url(url: str) -> str:
    """``url`` with every password (in the user info or a ``password=`` option) replaced by
    ``***``, fit for logs and error messages. Used by the transport and the startup log line.

    Deliberately not a URL parser: a password with an unescaped ``/``, ``?``, ``#`` or ``@``
    would fool ``urlsplit`` into showing part of it. Secret options are masked first, up to the
    next ``&``, so that an ``@`` inside one is gone before the user info is looked for; the user
    info is then everything up to the last ``@``, which a password cannot hide behind.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return _SECRET_OPTION.sub(r"\1***", url)
    rest = _SECRET_OPTION.sub(r"\1***", rest)
    if "@" in rest:
        userinfo, _, location = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon:
            rest = f"{user}:***@{location}"
    return f"{scheme}{separator}{rest}"


def is_tls(url: str) -> bool:
    """True for the ``rediss`` schemes (``rediss://``, ``rediss+cluster://`` ...)."""
    entry = SCHEMES.get(url.partition("://")[0].lower())
    return entry is not None and entry[1]


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """A parsed ``redis_url``. ``hosts`` are the seed nodes (cluster) or the sentinels; for a
    standalone URL they are empty and ``url`` goes to redis-py as it is."""

    url: str = field(repr=False)
    topology: Topology
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: dict[str, str] = field(default_factory=dict)

    @property
    def redacted(self) -> str:
        """The URL as logs may show it."""
        return redact_url(self.url)


def parse_broker_url(url: str) -> BrokerURL:
    """Read ``url``'s topology; raise ValueError with a one-line reason (never the password)."""
    scheme, separator, _ = url.partition("://")
    entry = SCHEMES.get(scheme.lower()) if separator else None
    if entry is None:
        raise ValueError(
            "scheme must be redis://, rediss://, unix://, redis+cluster://, redis+sentinel:// "
            f"(or their rediss+ TLS forms) or memory:// (one process only), not "
            f"{scheme.lower() + '://' if separator else 'none'}"
        )
    topology, tls = entry
    if topology in ("standalone", "memory"):
        return BrokerURL(url=url, topology=topology, tls=tls)
    rest = url[len(scheme) + 3 :]
    # The user info ends at the last "@" before the path: a password may hold any character.
    before_query, _, query = rest.partition("?")
    userinfo, at, location = before_query.rpartition("@")
    if not at:
        location = before_query
    hosts_text, _, path = location.partition("/")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
    hosts = tuple(_host_port(part, scheme) for part in hosts_text.split(","))
    options = {name: values[-1] for name, values in parse_qs(query).items()}
    segments = [segment for segment in path.split("/") if segment]
    service_name = None
    db = 0
    if topology == "sentinel":
        if not segments:
            raise ValueError(
                f"a {scheme}:// URL needs the service name after the hosts: "
                f"{scheme}://host:26379[,host:26379...]/service_name[/db]"
            )
        service_name = unquote(segments.pop(0))
    if segments:
        if len(segments) > 1 or not segments[0].isdigit():
            raise ValueError(f"the database in a {scheme}:// URL must be a number")
        db = int(segments[0])
        if topology == "cluster" and db != 0:
            raise ValueError("Redis Cluster has only database 0: drop the /db from the URL")
    if "db" in options:
        raise ValueError(f"give the database of a {scheme}:// URL in its path, not as ?db=")
    return BrokerURL(
        url=url,
        topology=topology,
        tls=tls,
        hosts=hosts,
        service_name=service_name,
        db=db,
        username=username,
        password=password,
        options=options,
    )


def _host_port(text: str, scheme: str) -> tuple[str, int]:
    default_port = 26379 if "sentinel" in scheme else 6379
    match = _HOST_PORT.match(text)
    if match is None:
        # Not quoted: with a "?" or "/" left unencoded in a password, "text" may hold part of it.
        raise ValueError(
            f"{scheme}:// URL: the hosts must be host:port[,host:port...], with any password "
            "percent-encoded"
        )
    host, port_text = match.groups()
    port = default_port if port_text is None else int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{scheme}:// URL: port {port} of {host} is out of range")
    return host.strip("[]"), port
