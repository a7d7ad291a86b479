"""Broker URLs: the topologies they name, and the one redaction the transport and the logs use."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from fastapi_leader import LeaderSettings
from fastapi_leader.redis_url import is_tls, parse_broker_url, redact_url
from fastapi_leader.transport.base import Names
from fastapi_leader.transport.redis import RedisTransport

PASSWORD = "s3cr#t@p/ss"  # holds the characters that fooled the old redaction
ENCODED = quote(PASSWORD, safe="")  # as redis-py needs it in the user info


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://app:pw@cache:6379/0", "redis://app:***@cache:6379/0"),
        ("redis://app@cache:6379/0", "redis://app@cache:6379/0"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        (f"redis://:{PASSWORD}@cache:6379/0", "redis://:***@cache:6379/0"),
        (f"redis://cache:6379/0?password={PASSWORD}", "redis://cache:6379/0?password=***"),
        (
            f"redis://cache:6379/0?client_name=a&password={PASSWORD}&db=1",
            "redis://cache:6379/0?client_name=a&password=***&db=1",
        ),
        (f"redis://u:{PASSWORD}@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        (
            f"redis+cluster://u:{PASSWORD}@n1:7000,n2:7001",
            "redis+cluster://u:***@n1:7000,n2:7001",
        ),
        (
            f"rediss+sentinel://:{PASSWORD}@s1:26379,s2:26379/main/2",
            "rediss+sentinel://:***@s1:26379,s2:26379/main/2",
        ),
        (
            f"redis+sentinel://s1:26379/main?sentinel_password={PASSWORD}",
            "redis+sentinel://s1:26379/main?sentinel_password=***",
        ),
        ("unix:///var/run/redis.sock", "unix:///var/run/redis.sock"),
    ],
)
def test_redact_url_hides_every_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
    assert not any(piece in redacted for piece in (":pw@", "s3cr", "p/ss", "#t"))


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{ENCODED}@cache:6379/0",
        f"redis://cache:6379/0?password={ENCODED}",
        f"redis+cluster://:{ENCODED}@n1:7000",
        f"redis+sentinel://:{ENCODED}@s1:26379/main",
    ],
)
def test_the_startup_log_and_the_transport_redact_alike(url: str) -> None:
    settings = LeaderSettings(redis_url=url)
    transport = RedisTransport(url, Names("p", "g", "n1"))
    assert settings.redis_url_redacted == redact_url(url)
    assert redact_url(url) in repr(transport)
    assert "s3cr" not in settings.redis_url_redacted
    assert "s3cr" not in repr(transport)


def test_cluster_url_lists_its_seed_nodes() -> None:
    url = parse_broker_url("rediss+cluster://app:p%40ss@n1:7000,[::1]:7001,n3?client_name=x")
    assert url.topology == "cluster"
    assert url.tls
    assert url.hosts == (("n1", 7000), ("::1", 7001), ("n3", 6379))
    assert (url.username, url.password) == ("app", "p@ss")
    assert url.options == {"client_name": "x"}


def test_sentinel_url_names_service_and_database() -> None:
    url = parse_broker_url("redis+sentinel://:pw@s1,s2:26380/main/3")
    assert url.topology == "sentinel"
    assert not url.tls
    assert url.hosts == (("s1", 26379), ("s2", 26380))
    assert (url.service_name, url.db) == ("main", 3)
    assert (url.username, url.password) == (None, "pw")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "needs the service name"),
        ("redis+cluster://n1:7000/2", "only database 0"),
        ("redis+cluster://n1:99999", "out of range"),
        ("redis+cluster://n1:7000,,n2", "host:port"),
        ("redis+sentinel://s1/main/x", "must be a number"),
        ("http://cache:6379", "scheme must be"),
        ("cache:6379", "scheme must be"),
    ],
)
def test_bad_urls_fail_in_one_line_naming_the_problem(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_broker_url(url)
    assert "\n" not in str(caught.value)


def test_settings_error_names_the_field_and_hides_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        LeaderSettings(redis_url=f"redis+sentinel://:{PASSWORD}@s1:26379")
    text = str(caught.value)
    assert text.startswith("redis_url=")
    assert "needs the service name" in text
    assert "s3cr" not in text


def test_a_password_with_an_unencoded_question_mark_is_not_quoted_in_errors() -> None:
    with pytest.raises(ValueError) as caught:
        parse_broker_url("redis+cluster://:pa?ss@n1:7000")
    assert "pa" not in str(caught.value).replace("password", "").replace("percent", "")


@pytest.mark.parametrize(
    ("url", "tls"),
    [
        ("redis://h", False),
        ("rediss://h", True),
        ("rediss+cluster://h:1", True),
        ("rediss+sentinel://h/s", True),
        ("redis+sentinel://h/s", False),
        ("unix:///s", False),
    ],
)
def test_is_tls(url: str, tls: bool) -> None:
    assert is_tls(url) is tls
