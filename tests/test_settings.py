"""LeaderSettings: sources, defaults, and every invariant checked at construction."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fastapi_leader.core import Timing
from fastapi_leader.settings import LeaderSettings, SettingsError
from tests.helpers.certs import KEY_PASSWORD, Certificates, make_certificates

PASSWORD = "hunter2-Sw0rdfish"
SECRET = "0123456789abcdef-top-secret"
OLD_SECRET = "fedcba9876543210-old-secret"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No ``LEADER_*`` variable and no ``.env`` file leaks in from the machine running the tests."""
    for name in list(os.environ):
        if name.upper().startswith("LEADER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def _leaks(secret: str, text: str) -> bool:
    """Whether any 8 consecutive characters of ``secret`` appear in ``text`` (pydantic shortens
    long input values in the middle, so a leak may be partial)."""
    return any(secret[i : i + 8] in text for i in range(len(secret) - 7))


def _error_text(**kwargs: Any) -> str:
    with pytest.raises(SettingsError) as caught:
        LeaderSettings(**kwargs)
    return str(caught.value)


# ---- defaults and sources -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("redis_url", "redis://localhost:6379/0"),
        ("group", "default"),
        ("channel_prefix", "fastapi-leader"),
        ("heartbeat_interval", 0.1),
        ("lease", 0.4),
        ("election_timeout_min", 0.5),
        ("election_timeout_max", 0.7),
        ("member_expiry", 1.0),
        ("secret", None),
        ("previous_secret", None),
        ("advertise_url", None),
        ("ssl_ca_certs", None),
        ("ssl_certfile", None),
        ("ssl_keyfile", None),
        ("ssl_keyfile_password", None),
        ("ssl_cert_reqs", "required"),
        ("ssl_check_hostname", True),
    ],
)
def test_defaults(field: str, expected: object) -> None:
    assert getattr(LeaderSettings(), field) == expected


def test_default_node_id_is_drawn_by_the_election_not_the_settings() -> None:
    # Drawn at import, the id would be copied into every worker forked from one parent.
    from fastapi_leader import LeaderElection

    settings = LeaderSettings()
    assert settings.node_id is None
    ids = {LeaderElection(settings).node_id for _ in range(20)}
    assert len(ids) == 20
    for node_id in ids:
        # The default must itself pass the name rule it is checked against.
        assert LeaderSettings(node_id=node_id).node_id == node_id


def test_loop_stall_limit_below_a_second_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="loop_stall_limit"):
        LeaderSettings(loop_stall_limit=0.5)
    assert LeaderSettings(loop_stall_limit=2).loop_stall_limit == 2.0


ENV_CASES = [
    (
        "LEADER_REDIS_URL",
        "rediss://cache.internal:6380/2",
        "redis_url",
        "rediss://cache.internal:6380/2",
    ),
    ("LEADER_GROUP", "billing", "group", "billing"),
    ("LEADER_CHANNEL_PREFIX", "acme.leader", "channel_prefix", "acme.leader"),
    ("LEADER_NODE_ID", "web-1", "node_id", "web-1"),
    ("LEADER_HEARTBEAT_INTERVAL", "0.05", "heartbeat_interval", 0.05),
    ("LEADER_LEASE", "0.3", "lease", 0.3),
    ("LEADER_ELECTION_TIMEOUT_MIN", "0.6", "election_timeout_min", 0.6),
    ("LEADER_ELECTION_TIMEOUT_MAX", "2", "election_timeout_max", 2.0),
    ("LEADER_MEMBER_EXPIRY", "3", "member_expiry", 3.0),
    ("LEADER_ADVERTISE_URL", "http://10.0.0.7:8000", "advertise_url", "http://10.0.0.7:8000"),
]


@pytest.mark.parametrize(("variable", "raw", "field", "expected"), ENV_CASES)
def test_reads_leader_environment_variables(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, raw)
    assert getattr(LeaderSettings(), field) == expected


def test_reads_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADER_SECRET", SECRET)
    secret = LeaderSettings().secret
    assert secret is not None
    assert secret.get_secret_value() == SECRET


@pytest.mark.parametrize(("variable", "raw", "field", "expected"), ENV_CASES)
def test_reads_dotenv_file_in_working_directory(
    clean_environment: Path, variable: str, raw: str, field: str, expected: object
) -> None:
    (clean_environment / ".env").write_text(f"{variable}={raw}\n")
    assert getattr(LeaderSettings(), field) == expected


def test_environment_overrides_dotenv_file(
    monkeypatch: pytest.MonkeyPatch, clean_environment: Path
) -> None:
    (clean_environment / ".env").write_text("LEADER_GROUP=from-file\nLEADER_NODE_ID=file-node\n")
    monkeypatch.setenv("LEADER_GROUP", "from-env")
    settings = LeaderSettings()
    assert (settings.group, settings.node_id) == ("from-env", "file-node")


def test_keyword_arguments_override_environment_and_dotenv(
    monkeypatch: pytest.MonkeyPatch, clean_environment: Path
) -> None:
    (clean_environment / ".env").write_text("LEADER_GROUP=from-file\nLEADER_LEASE=0.3\n")
    monkeypatch.setenv("LEADER_GROUP", "from-env")
    monkeypatch.setenv("LEADER_NODE_ID", "env-node")
    settings = LeaderSettings(group="from-kwargs", lease=0.25)
    assert (settings.group, settings.lease, settings.node_id) == ("from-kwargs", 0.25, "env-node")


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROUP", "unprefixed")
    monkeypatch.setenv("LEASE", "0.3")
    settings = LeaderSettings()
    assert (settings.group, settings.lease) == ("default", 0.4)


def test_settings_are_frozen() -> None:
    settings = LeaderSettings()
    with pytest.raises(ValidationError):
        settings.lease = 0.2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "seconds"),
    [
        ("heartbeat_interval", timedelta(milliseconds=50), 0.05),
        ("lease", timedelta(milliseconds=300), 0.3),
        ("election_timeout_min", timedelta(milliseconds=600), 0.6),
        ("election_timeout_max", timedelta(seconds=2, milliseconds=500), 2.5),
        ("member_expiry", timedelta(minutes=1), 60.0),
    ],
)
def test_durations_accept_timedelta(field: str, value: timedelta, seconds: float) -> None:
    settings = LeaderSettings(**{field: value})
    assert getattr(settings, field) == pytest.approx(seconds)
    assert isinstance(getattr(settings, field), float)


def test_durations_given_together_as_timedelta() -> None:
    settings = LeaderSettings(
        heartbeat_interval=timedelta(seconds=1),
        lease=timedelta(seconds=4),
        election_timeout_min=timedelta(seconds=5),
        election_timeout_max=timedelta(seconds=8),
        member_expiry=timedelta(seconds=10),
    )
    assert (settings.heartbeat_interval, settings.lease, settings.election_timeout_max) == (
        1.0,
        4.0,
        8.0,
    )


@pytest.mark.parametrize(
    "redis_url",
    [
        "redis://localhost:6379/0",
        "rediss://user:pw@cache.example.com:6380/1",
        "unix:///var/run/redis.sock",
        "memory://",
    ],
)
def test_accepted_redis_url_schemes(redis_url: str) -> None:
    assert LeaderSettings(redis_url=redis_url).redis_url == redis_url


@pytest.mark.parametrize(
    "name", ["a", "A1", "billing", "web-1.eu_west", "9lives", "x" * 64, "a.-_b"]
)
@pytest.mark.parametrize("field", ["group", "channel_prefix", "node_id"])
def test_accepted_names(field: str, name: str) -> None:
    assert getattr(LeaderSettings(**{field: name}), field) == name


# ---- invalid single values --------------------------------------------------------------------

BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("x" * 65, id="too-long"),
    pytest.param("has space", id="space"),
    pytest.param("a:b", id="colon"),
    pytest.param("a/b", id="slash"),
    pytest.param("-leading-dash", id="leading-dash"),
    pytest.param(".leading-dot", id="leading-dot"),
    pytest.param("_leading-underscore", id="leading-underscore"),
    pytest.param("caf\u00e9", id="non-ascii"),
    pytest.param("a*", id="glob"),
    pytest.param("a\nb", id="inner-newline"),
]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("field", ["group", "channel_prefix", "node_id"])
def test_bad_names_are_rejected_naming_the_field(field: str, name: str) -> None:
    text = _error_text(**{field: name})
    assert field in text
    assert "1 to 64 characters" in text


@pytest.mark.parametrize("field", ["group", "channel_prefix", "node_id"])
def test_regression_name_with_trailing_newline_is_rejected(field: str) -> None:
    # `$` in the name pattern also matches just before a final "\n", so "billing\n" passed the
    # check and would end up inside channel names and every message.
    text = _error_text(**{field: "billing\n"})
    assert field in text


@pytest.mark.parametrize(
    "redis_url",
    [
        "http://localhost:6379",
        "https://localhost",
        "localhost:6379",
        "tcp://localhost:6379",
        "",
        "/var/run/redis.sock",
    ],
)
def test_bad_redis_url_scheme_is_rejected_naming_the_field(redis_url: str) -> None:
    text = _error_text(redis_url=redis_url)
    assert "redis_url" in text
    assert "scheme must be" in text


DURATION_FIELDS = [
    "heartbeat_interval",
    "lease",
    "election_timeout_min",
    "election_timeout_max",
    "member_expiry",
]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(0, id="zero"),
        pytest.param(0.0, id="zero-float"),
        pytest.param(-1.0, id="negative"),
        pytest.param(timedelta(0), id="zero-timedelta"),
        pytest.param(timedelta(seconds=-1), id="negative-timedelta"),
        pytest.param(math.inf, id="inf"),
        pytest.param(math.nan, id="nan"),
        pytest.param("inf", id="inf-text"),
        pytest.param("nan", id="nan-text"),
        pytest.param("soon", id="text"),
    ],
)
@pytest.mark.parametrize("field", DURATION_FIELDS)
def test_non_positive_or_non_finite_durations_are_rejected(field: str, value: object) -> None:
    assert field in _error_text(**{field: value})


@pytest.mark.parametrize("field", DURATION_FIELDS)
def test_non_finite_duration_from_environment_is_rejected(
    monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    monkeypatch.setenv(f"LEADER_{field.upper()}", "inf")
    with pytest.raises(SettingsError) as caught:
        LeaderSettings()
    assert field in str(caught.value)


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param("", id="empty"),
        pytest.param("short", id="short"),
        pytest.param("x" * 15, id="15"),
    ],
)
def test_short_secret_is_rejected(secret: str) -> None:
    text = _error_text(secret=secret)
    assert "secret" in text
    assert "at least 16 characters" in text


def test_secret_of_16_characters_is_accepted() -> None:
    secret = LeaderSettings(secret="x" * 16).secret
    assert secret is not None
    assert secret.get_secret_value() == "x" * 16


@pytest.mark.parametrize(
    "advertise_url",
    [
        pytest.param("10.0.0.7:8000", id="no-scheme"),
        pytest.param("ftp://host/", id="ftp"),
        pytest.param("http://", id="no-host"),
        pytest.param("/leader", id="relative"),
        pytest.param("", id="empty"),
        pytest.param("http://h/" + "x" * 504, id="513-bytes"),
        pytest.param("http://h/" + "\u00e9" * 300, id="309-chars-609-bytes"),
        pytest.param("http://h/\x07", id="control-character"),
    ],
)
def test_bad_advertise_url_is_rejected_naming_the_field(advertise_url: str) -> None:
    assert "advertise_url" in _error_text(advertise_url=advertise_url)


@pytest.mark.parametrize(
    "advertise_url",
    ["http://10.0.0.7:8000", "https://api.example.com/", "http://h/" + "x" * 503],
)
def test_accepted_advertise_urls(advertise_url: str) -> None:
    assert LeaderSettings(advertise_url=advertise_url).advertise_url == advertise_url


def test_the_settings_refuse_an_advertise_url_with_the_codecs_own_words() -> None:
    # One rule, one message: a URL the settings accept is one every message can carry.
    from fastapi_leader.messages import url_problem

    url = "http://h/" + "\u00e9" * 300
    problem = url_problem(url)
    assert problem is not None
    assert problem in _error_text(advertise_url=url)


def test_the_timing_defaults_are_the_cores() -> None:
    from fastapi_leader.core import Timing

    s, t = LeaderSettings(), Timing()
    names = ("heartbeat_interval", "lease", "election_timeout_min", "election_timeout_max")
    for name in (*names, "member_expiry"):
        assert getattr(s, name) == getattr(t, name), name


# ---- timing rules -------------------------------------------------------------------------------

TIMING_RULES = [
    pytest.param(
        {"heartbeat_interval": 0.1, "lease": 0.19},
        ["lease (0.19)", "heartbeat_interval (0.1)", "at least 2 x"],
        id="lease-below-two-heartbeats",
    ),
    pytest.param(
        {"heartbeat_interval": 0.1, "lease": 0.45, "election_timeout_min": 0.5},
        [
            "lease (0.45)",
            "election_timeout_min (0.5)",
            "heartbeat_interval (0.1)",
            "must not exceed",
        ],
        id="lease-beyond-timeout-min-minus-heartbeat",
    ),
    pytest.param(
        {"lease": 1.0, "election_timeout_min": 1.0, "election_timeout_max": 2.0},
        ["lease (1.0)", "election_timeout_min (1.0)", "heartbeat_interval (0.1)"],
        id="lease-equal-to-timeout-min",
    ),
    pytest.param(
        {"election_timeout_min": 0.7, "election_timeout_max": 0.6},
        ["election_timeout_max (0.6)", "election_timeout_min (0.7)", "must not be below"],
        id="max-below-min",
    ),
    pytest.param(
        {"member_expiry": 0.15},
        ["member_expiry (0.15)", "heartbeat_interval (0.1)", "at least 2 x"],
        id="member-expiry-below-two-heartbeats",
    ),
    pytest.param(
        {
            "heartbeat_interval": timedelta(seconds=1),
            "lease": timedelta(seconds=1),
            "election_timeout_min": timedelta(seconds=5),
            "election_timeout_max": timedelta(seconds=6),
            "member_expiry": timedelta(seconds=5),
        },
        ["lease (1.0)", "heartbeat_interval (1.0)"],
        id="timedelta-lease-below-two-heartbeats",
    ),
]


@pytest.mark.parametrize(("overrides", "phrases"), TIMING_RULES)
def test_timing_rules_fail_naming_fields_and_rule(
    overrides: dict[str, Any], phrases: list[str]
) -> None:
    text = _error_text(**overrides)
    for phrase in phrases:
        assert phrase in text


@pytest.mark.parametrize(("overrides", "phrases"), TIMING_RULES)
def test_timing_rules_apply_to_environment_too(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any], phrases: list[str]
) -> None:
    for field, value in overrides.items():
        seconds = value.total_seconds() if isinstance(value, timedelta) else value
        monkeypatch.setenv(f"LEADER_{field.upper()}", str(seconds))
    with pytest.raises(SettingsError) as caught:
        LeaderSettings()
    for phrase in phrases:
        assert phrase in str(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="defaults-lease-equals-timeout-min-minus-heartbeat"),
        pytest.param({"heartbeat_interval": 0.1, "lease": 0.2}, id="lease-exactly-two-heartbeats"),
        pytest.param({"member_expiry": 0.2}, id="expiry-exactly-two-heartbeats"),
        pytest.param({"election_timeout_max": 0.5}, id="max-equals-min"),
        pytest.param(
            {
                "heartbeat_interval": 2,
                "lease": 10,
                "election_timeout_min": 12,
                "election_timeout_max": 20,
                "member_expiry": 30,
            },
            id="slow-cluster",
        ),
    ],
)
def test_timings_on_the_boundaries_are_accepted(overrides: dict[str, Any]) -> None:
    settings = LeaderSettings(**overrides)
    for field, value in overrides.items():
        assert getattr(settings, field) == value


# ---- secrets never leak ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "redis_url",
    [
        f"redis://:{PASSWORD}@cache.internal:6379/0",
        f"redis://app:{PASSWORD}@cache.internal:6379/0",
        f"rediss://app:{PASSWORD}@cache.internal/0",
    ],
)
def test_password_never_in_repr_or_str(redis_url: str) -> None:
    settings = LeaderSettings(redis_url=redis_url, secret=SECRET)
    for text in (repr(settings), str(settings)):
        assert not _leaks(PASSWORD, text)
        assert not _leaks(SECRET, text)
    assert settings.redis_url == redis_url  # still usable


@pytest.mark.parametrize(
    ("redis_url", "redacted"),
    [
        (f"redis://:{PASSWORD}@cache.internal:6379/0", "redis://:***@cache.internal:6379/0"),
        (
            f"redis://app:{PASSWORD}@cache.internal:6379/0",
            "redis://app:***@cache.internal:6379/0",
        ),
        (f"rediss://app:{PASSWORD}@cache.internal/2", "rediss://app:***@cache.internal/2"),
        (f"redis://:{PASSWORD}@10.0.0.5:6380", "redis://:***@10.0.0.5:6380"),
        ("redis://cache.internal:6379/0", "redis://cache.internal:6379/0"),
        ("redis://app@cache.internal:6379/0", "redis://app@cache.internal:6379/0"),
        ("unix:///var/run/redis.sock", "unix:///var/run/redis.sock"),
    ],
)
def test_redis_url_redacted_masks_the_password(redis_url: str, redacted: str) -> None:
    settings = LeaderSettings(redis_url=redis_url)
    assert settings.redis_url_redacted == redacted
    assert PASSWORD not in settings.redis_url_redacted


def test_regression_redis_url_redacted_keeps_ipv6_brackets() -> None:
    # urlsplit().hostname strips the brackets of an IPv6 literal; rebuilding the netloc from it
    # gave "redis://:***@::1:6379/0", which is no longer a URL of the same server.
    settings = LeaderSettings(redis_url=f"redis://:{PASSWORD}@[::1]:6379/0")
    assert settings.redis_url_redacted == "redis://:***@[::1]:6379/0"


@pytest.mark.parametrize(
    ("kwargs", "secret"),
    [
        pytest.param(
            {"redis_url": "redis://:0xC0FFEE@h", "lease": 5}, "0xC0FFEE", id="timing-password"
        ),
        pytest.param({"secret": SECRET, "lease": 5}, SECRET, id="timing-secret"),
        pytest.param(
            {"redis_url": f"http://app:{PASSWORD}@cache.internal:6379/0"},
            PASSWORD,
            id="scheme-error-password",
        ),
    ],
)
def test_regression_validation_error_does_not_echo_password_or_secret(
    kwargs: dict[str, Any], secret: str
) -> None:
    # A configuration error is logged at startup; pydantic's message includes the input value
    # (for the timing rules, the whole input dict) unless the model hides it.
    assert not _leaks(secret, _error_text(**kwargs))


# ---- key rotation: previous_secret ----------------------------------------------------------


def test_previous_secret_is_read_from_the_environment_and_follows_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEADER_SECRET", SECRET)
    monkeypatch.setenv("LEADER_PREVIOUS_SECRET", OLD_SECRET)
    settings = LeaderSettings()
    assert settings.message_keys == [SECRET.encode(), OLD_SECRET.encode()]
    for text in (repr(settings), str(settings)):
        assert not _leaks(OLD_SECRET, text)


def test_message_keys_without_and_with_a_secret() -> None:
    assert LeaderSettings().message_keys == []
    assert LeaderSettings(secret=SECRET).message_keys == [SECRET.encode()]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"previous_secret": OLD_SECRET}, "secret is not", id="without-secret"),
        pytest.param({"secret": SECRET, "previous_secret": "short"}, "at least 16", id="short"),
        pytest.param(
            {"secret": SECRET, "previous_secret": SECRET}, "must differ", id="same-as-secret"
        ),
    ],
)
def test_bad_previous_secret_is_rejected_naming_the_field(
    kwargs: dict[str, Any], expected: str
) -> None:
    text = _error_text(**kwargs)
    assert "previous_secret" in text
    assert expected in text
    assert not _leaks(SECRET, text)
    assert not _leaks(OLD_SECRET, text)


# ---- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def test_tls_files_become_redis_py_options(certificates: Certificates) -> None:
    settings = LeaderSettings(
        redis_url="rediss://cache.internal:6380/0",
        ssl_ca_certs=certificates.ca,
        ssl_certfile=certificates.client_cert,
        ssl_keyfile=certificates.client_key_encrypted,
        ssl_keyfile_password=KEY_PASSWORD,
    )
    assert settings.redis_ssl_options == {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(certificates.ca),
        "ssl_certfile": str(certificates.client_cert),
        "ssl_keyfile": str(certificates.client_key_encrypted),
        "ssl_password": KEY_PASSWORD,
    }
    for text in (repr(settings), str(settings)):
        assert not _leaks(KEY_PASSWORD, text)


def test_tls_options_of_a_plain_rediss_url_verify_the_server() -> None:
    assert LeaderSettings(redis_url="rediss://h/0").redis_ssl_options == {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }
    unverified = LeaderSettings(redis_url="rediss://h/0", ssl_cert_reqs="none")
    # Python refuses a hostname check without certificate verification.
    assert unverified.redis_ssl_options == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    assert LeaderSettings(redis_url="redis://h/0").redis_ssl_options == {}


def test_tls_settings_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, certificates: Certificates
) -> None:
    monkeypatch.setenv("LEADER_REDIS_URL", "rediss://cache.internal:6380/0")
    monkeypatch.setenv("LEADER_SSL_CA_CERTS", str(certificates.ca))
    monkeypatch.setenv("LEADER_SSL_CERTFILE", str(certificates.client_combined))
    monkeypatch.setenv("LEADER_SSL_CERT_REQS", "optional")
    monkeypatch.setenv("LEADER_SSL_CHECK_HOSTNAME", "false")
    settings = LeaderSettings()
    assert settings.ssl_ca_certs == certificates.ca
    assert settings.ssl_certfile == certificates.client_combined
    assert (settings.ssl_cert_reqs, settings.ssl_check_hostname) == ("optional", False)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ssl_ca_certs", "ca"),
        ("ssl_certfile", "client_combined"),
        ("ssl_cert_reqs", "none"),
        ("ssl_check_hostname", False),
    ],
)
@pytest.mark.parametrize("redis_url", ["redis://h:6379/0", "unix:///run/redis.sock"])
def test_tls_settings_need_a_rediss_url(
    certificates: Certificates, field: str, value: object, redis_url: str
) -> None:
    if isinstance(value, str) and hasattr(certificates, value):
        value = getattr(certificates, value)
    text = _error_text(redis_url=redis_url, **{field: value})
    assert field in text
    assert "rediss://" in text


@pytest.mark.parametrize("field", ["ssl_ca_certs", "ssl_certfile", "ssl_keyfile"])
def test_missing_tls_file_is_rejected_naming_the_field(
    certificates: Certificates, tmp_path: Path, field: str
) -> None:
    given: dict[str, Any] = {"ssl_certfile": certificates.client_cert}
    given[field] = tmp_path / "missing.pem"
    text = _error_text(redis_url="rediss://h/0", **given)
    assert field in text


@pytest.mark.parametrize(
    ("files", "named"),
    [
        pytest.param({"ssl_ca_certs": "not_pem"}, "ssl_ca_certs: cannot read", id="ca-not-pem"),
        pytest.param({"ssl_ca_certs": "client_key"}, "ssl_ca_certs: cannot read", id="ca-is-a-key"),
        pytest.param({"ssl_certfile": "not_pem"}, "ssl_certfile: cannot load", id="cert-not-pem"),
        pytest.param({"ssl_certfile": "client_cert"}, "ssl_certfile", id="cert-without-its-key"),
        pytest.param(
            {"ssl_certfile": "client_cert", "ssl_keyfile": "server_key"},
            "ssl_keyfile: the private key does not match",
            id="key-of-another-certificate",
        ),
        pytest.param(
            {"ssl_certfile": "client_cert", "ssl_keyfile": "client_key_encrypted"},
            "ssl_keyfile_password: missing passphrase",
            id="encrypted-key-without-password",
        ),
        pytest.param(
            {
                "ssl_certfile": "client_cert",
                "ssl_keyfile": "client_key_encrypted",
                "ssl_keyfile_password": "wrong password",
            },
            "ssl_keyfile_password: wrong passphrase",
            id="encrypted-key-wrong-password",
        ),
        pytest.param({"ssl_keyfile": "client_key"}, "ssl_keyfile", id="key-without-cert"),
        pytest.param(
            {"ssl_keyfile_password": "pw"}, "ssl_keyfile_password", id="password-without-cert"
        ),
    ],
)
def test_unusable_tls_files_are_rejected_at_startup_naming_the_setting(
    certificates: Certificates, tmp_path: Path, files: dict[str, str], named: str
) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("-----BEGIN NOTHING-----\nhello\n")
    given: dict[str, Any] = {
        field: not_pem if name == "not_pem" else getattr(certificates, name, name)
        for field, name in files.items()
    }
    text = _error_text(redis_url="rediss://h/0", **given)
    assert named in text
    assert not _leaks(KEY_PASSWORD, text)


def test_a_tls_option_may_not_be_given_twice(certificates: Certificates) -> None:
    text = _error_text(
        redis_url=f"rediss://h/0?ssl_ca_certs={certificates.ca}", ssl_ca_certs=certificates.ca
    )
    assert "ssl_ca_certs" in text
    assert "both" in text


PROFILES = {"fast": LeaderSettings.FAST_PROFILE, "economy": LeaderSettings.ECONOMY_PROFILE}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_a_profile_sets_its_timings_and_overrides_win(name: str) -> None:
    profile = PROFILES[name]
    settings = getattr(LeaderSettings, name)(group="billing", lease=profile["lease"] * 0.9)
    assert settings.group == "billing"
    assert settings.lease == profile["lease"] * 0.9
    for field, value in profile.items():
        if field != "lease":
            assert getattr(settings, field) == value


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_a_profiles_environment_variables_in_its_docstring_are_the_profile(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The docstring tells users how to set the profile through the environment alone: it
    # must say what the profile is.
    doc = getattr(LeaderSettings, name).__doc__ or ""
    variables = dict(re.findall(r"(LEADER_[A-Z_]+)=([0-9.]+)", doc))
    assert {k.removeprefix("LEADER_").lower() for k in variables} == set(PROFILES[name])
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    from_env = LeaderSettings()
    for field, value in PROFILES[name].items():
        assert getattr(from_env, field) == value


def test_the_economy_profile_beats_in_the_groups_slowest_rhythm() -> None:
    # Three presences per member expiry up to the group size where the heartbeat takes over:
    # a group of 3 costs the leader's renewals plus two presences per 12 s.
    s = LeaderSettings.economy()
    timing = Timing(
        heartbeat_interval=s.heartbeat_interval,
        lease=s.lease,
        election_timeout_min=s.election_timeout_min,
        election_timeout_max=s.election_timeout_max,
        member_expiry=s.member_expiry,
    )
    assert timing.presence_interval(3) == 12.0
    assert timing.member_expiry_for(3) == 36.0
