"""The ``fastapi-leader`` command line against a running group of nodes on a real server:
``status`` agrees with every node, ``watch`` prints the failover, ``resign`` moves the lead,
``check`` finds a broken ACL user and a slow round trip, and every error is one line.

Most runs call :func:`fastapi_leader.cli.main` on a thread of the test process (a fresh
interpreter costs seconds of imports on a loaded box); those about what only a process shows
(Ctrl-C, the exit code and stderr of a failure, the console script) run ``python -m
fastapi_leader`` as users do.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from fastapi_leader import LeaderSettings
from fastapi_leader.cli import GroupView, main
from fastapi_leader.messages import Codec, Kind, Message
from fastapi_leader.testing import RedisServer
from fastapi_leader.transport.base import Names
from fastapi_leader.transport.redis import acl_rule
from tests.chaos.proxy import FaultProxy
from tests.conftest import MakeRedisServer
from tests.helpers.cluster import Cluster, eventually

# Bounds a whole CLI run: a fresh interpreter importing the package on a loaded 2-core box,
# plus what the command itself waits for (a few seconds at most).
RUN_TIMEOUT = 60.0
SECRET = "a-shared-key-of-32-characters!!!"
ROOT = Path(__file__).resolve().parents[1]

# Timings for tests about something other than speed (as tests/e2e's STEADY): a leader keeps its
# lease through a one-second stall of a loaded box, so no test sees an unrelated re-election.
# The tool is given the same, as an operator gives it the group's.
STEADY = {
    "lease": 1.0,
    "election_timeout_min": 1.2,
    "election_timeout_max": 1.5,
    "member_expiry": 2.0,
}
STEADY_ENV = {f"LEADER_{name.upper()}": str(value) for name, value in STEADY.items()}
STEADY_FLAGS = [
    item for name, value in STEADY.items() for item in (f"--{name.replace('_', '-')}", str(value))
]


@dataclass
class Run:
    code: int
    out: str
    err: str


def _env(**extra: str) -> dict[str, str]:
    # The developer's own LEADER_* settings must not leak into what is tested.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADER_")}
    env.update(STEADY_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _no_leader_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # In-process runs read the environment and ./.env as the tool does: keep both empty.
    for name in [name for name in os.environ if name.startswith("LEADER_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


async def here(*args: str, steady: bool = True) -> Run:
    """Run ``main(args)`` to its end, on a thread (it runs an event loop of its own), with the
    group's steady timings unless not ``steady``."""
    out, err = io.StringIO(), io.StringIO()
    argv = [*args, *STEADY_FLAGS] if steady else list(args)
    code = await asyncio.wait_for(asyncio.to_thread(main, argv, out, err), RUN_TIMEOUT)
    return Run(code, out.getvalue(), err.getvalue())


async def cli(*args: str, cwd: Path, **env: str) -> Run:
    """Run ``python -m fastapi_leader *args`` to its end, in a process of its own."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastapi_leader",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=_env(**env),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def assert_one_line_error(run: Run) -> str:
    assert run.code == 2, run
    assert "Traceback" not in run.err, run.err
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("fastapi-leader: ")
    return lines[0]


@pytest.fixture
async def group(redis_url: str) -> AsyncIterator[Cluster]:
    """Three running nodes with advertised URLs, and a leader they agree on."""
    async with Cluster(redis_url, **STEADY) as cluster:
        for i in range(3):
            await cluster.add(advertise_url=f"http://10.0.0.{i}:8000")
        await cluster.wait_for_single_leader()
        yield cluster


# ---- what an observer makes of the messages (no server) -----------------------------------------

OTHER_SECRET = "another-key-of-32-characters!!!!"


@pytest.mark.parametrize(
    ("group_keys", "tool_keys", "expected"),
    [
        pytest.param([], [], None, id="neither-signs"),
        pytest.param([SECRET], [SECRET], None, id="same-key"),
        pytest.param([SECRET], [], "the group signs its messages", id="tool-without-key"),
        pytest.param([], [SECRET], "the group does not sign", id="tool-with-a-key"),
        pytest.param([SECRET], [OTHER_SECRET], "is not the group's key", id="wrong-key"),
    ],
)
def test_observer_tells_why_it_cannot_read_the_group(
    group_keys: list[str], tool_keys: list[str], expected: str | None
) -> None:
    node = Codec("g", [key.encode() for key in group_keys])
    view = GroupView(Codec("g", [key.encode() for key in tool_keys]), own_id="cli-1")
    view.take(node.encode(Message(Kind.HEARTBEAT, "g", "n1", 3, 1, url="http://n1/")), 1.0)
    mismatch = view.signing_mismatch
    if expected is None:
        assert mismatch is None
        assert (view.beat_leader, view.beat_term, view.members["n1"].url) == ("n1", 3, "http://n1/")
    else:
        assert mismatch is not None and expected in mismatch
        assert view.members == {}


def test_observer_never_counts_a_resign_request_or_a_handed_over_leader_as_gone() -> None:
    codec = Codec("g")
    view = GroupView(codec, own_id="cli-1")
    view.take(codec.encode(Message(Kind.HEARTBEAT, "g", "n1", 3, 1)), 1.0)
    view.take(codec.encode(Message(Kind.RESIGN_REQUEST, "g", "cli-2", 3, 1, target="n1")), 1.1)
    assert set(view.members) == {"n1"}  # another tool is no member
    view.take(codec.encode(Message(Kind.HANDOVER, "g", "n1", 3, 2, target="n2")), 1.2)
    assert view.beat_leader is None  # the leadership ended ...
    assert set(view.members) == {"n1"}  # ... not the membership
    view.take(codec.encode(Message(Kind.LEAVE, "g", "n1", 3, 3)), 1.3)
    assert view.members == {}


# ---- status -------------------------------------------------------------------------------------


async def test_status_agrees_with_every_node(
    group: Cluster, redis_url: str, tmp_path: Path
) -> None:
    run = await cli(
        "status", "--json", "--redis-url", redis_url, "--group", group.group, cwd=tmp_path
    )
    assert run.code == 0, run
    seen = json.loads(run.out)
    leader = group.leader()
    assert leader is not None
    for node in group.nodes:
        status = node.status()
        assert (seen["leader_id"], seen["term"]) == (status.leader_id, leader.fencing_token)
    assert seen["lease_remaining"] is not None and 0 < seen["lease_remaining"] <= STEADY["lease"]
    members = {m["node_id"]: m for m in seen["members"]}
    assert set(members) == {node.node_id for node in group.nodes}
    for node in group.nodes:
        assert members[node.node_id]["url"] == node.settings.advertise_url
        assert members[node.node_id]["is_leader"] is (node is leader)
        assert members[node.node_id]["last_seen_ago"] >= 0


async def test_status_text_names_the_leader_and_members(group: Cluster, redis_url: str) -> None:
    run = await here("status", "--redis-url", redis_url, "--group", group.group)
    assert run.code == 0, run
    leader = group.leader()
    assert leader is not None
    assert f"leader   {leader.node_id} (term {leader.fencing_token}" in run.out
    for node in group.nodes:
        assert f"  {node.node_id}  {node.settings.advertise_url}  seen " in run.out


async def test_status_of_a_group_without_leader_exits_1(redis_url: str) -> None:
    run = await here("status", "--json", "--redis-url", redis_url, "--group", "nobody")
    assert run.code == 1, run
    seen = json.loads(run.out)
    assert (seen["leader_id"], seen["members"]) == (None, [])


async def test_status_without_the_secret_still_names_the_leader(redis_url: str) -> None:
    async with Cluster(redis_url, secret=SECRET, **STEADY) as cluster:
        for _ in range(2):
            await cluster.add()
        leader = await cluster.wait_for_single_leader()
        run = await here("status", "--json", "--redis-url", redis_url, "--group", cluster.group)
        # watch has nothing to show without the messages: it says why, in one line.
        watch = await here(
            "watch", "--duration", "20", "--redis-url", redis_url, "--group", cluster.group
        )
    assert run.code == 0, run
    seen = json.loads(run.out)
    assert seen["leader_id"] == leader.node_id
    assert seen["members"] == []
    assert any("set LEADER_SECRET" in note for note in seen["notes"]), seen
    assert "the group signs its messages" in assert_one_line_error(watch)


# ---- watch --------------------------------------------------------------------------------------


async def test_watch_prints_the_failover_and_exits_0_on_ctrl_c(
    group: Cluster, redis_url: str, tmp_path: Path
) -> None:
    old = group.leader()
    assert old is not None
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastapi_leader",
        "watch",
        "--redis-url",
        redis_url,
        "--group",
        group.group,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=_env(),
    )
    assert process.stdout is not None and process.stderr is not None
    lines: list[str] = []

    async def read_until(text: str) -> str:
        while True:
            line = (await asyncio.wait_for(process.stdout.readline(), RUN_TIMEOUT)).decode()
            assert line, f"watch ended before printing {text!r}: {lines}"
            lines.append(line)
            if text in line:
                return line

    try:
        await read_until(f"leader is {old.node_id} (term {old.fencing_token})")
        await old.stop()  # hands over as it leaves
        new = await group.wait_for_single_leader()
        await read_until(f"{old.node_id} hands over to {new.node_id}")
        await read_until(f"leader is {new.node_id} (term {new.fencing_token}) after")
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), RUN_TIMEOUT)
        err = (await process.stderr.read()).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, (lines, err)
    assert "Traceback" not in err, err
    # Every line starts with a timestamp, as the demo prints them.
    assert all(line[2] == ":" and line[12] == " " for line in lines), lines


# ---- resign -------------------------------------------------------------------------------------


async def test_resign_moves_the_lead(group: Cluster, redis_url: str) -> None:
    old = group.leader()
    assert old is not None
    old_term = old.fencing_token
    assert old_term is not None
    run = await here("resign", "--redis-url", redis_url, "--group", group.group)
    assert run.code == 0, run
    new = await group.wait_for_single_leader()
    assert new is not old
    assert new.fencing_token is not None and new.fencing_token > old_term
    assert f"asked {old.node_id} (term {old_term}) to hand over" in run.out
    assert f"{new.node_id} leads (term {new.fencing_token}" in run.out
    assert old.running  # it stays in the group


async def test_resign_in_a_signed_group_needs_the_secret(redis_url: str, tmp_path: Path) -> None:
    async with Cluster(redis_url, secret=SECRET, **STEADY) as cluster:
        for _ in range(3):
            await cluster.add()
        old = await cluster.wait_for_single_leader()
        args = ("resign", "--redis-url", redis_url, "--group", cluster.group)

        refused = await cli(*args, cwd=tmp_path)
        assert "the group signs its messages" in assert_one_line_error(refused)
        assert cluster.leader() is old

        # Sent anyway, as a tool that cannot tell would: every node drops it, and counts it.
        names = Names("fastapi-leader", cluster.group, old.node_id)
        request = Message(
            Kind.RESIGN_REQUEST, cluster.group, "cli-x", old.fencing_token or 0, 1, old.node_id
        )
        before = old.counters["dropped_unsigned"]
        async with Redis.from_url(redis_url) as admin:
            await admin.publish(names.own_channel, Codec(cluster.group).encode(request))
        await eventually(lambda: old.counters["dropped_unsigned"] > before, what="the drop")
        assert cluster.leader() is old

        moved = await cli(*args, cwd=tmp_path, LEADER_SECRET=SECRET)
        assert moved.code == 0, moved
        new = await cluster.wait_for_single_leader()
        assert new is not old


async def test_resign_without_a_leader_exits_1(redis_url: str) -> None:
    run = await here("resign", "--redis-url", redis_url, "--group", "nobody")
    assert run.code == 1, run
    assert "no leader" in run.out


# ---- check --------------------------------------------------------------------------------------


def _findings(run: Run) -> dict[str, str]:
    """topic -> level, from check's lines ("<level> <topic>: <text>")."""
    found = {}
    for line in run.out.splitlines():
        level, _, rest = line.partition(" ")
        found[rest.strip().partition(":")[0]] = level
    return found


@pytest.fixture
async def acl_user(redis_url: str) -> AsyncIterator[tuple[Redis, list[str]]]:
    """An admin connection, and the users made with it (deleted after the test)."""
    users: list[str] = []
    async with Redis.from_url(redis_url) as admin:
        yield admin, users
        for user in users:
            await admin.execute_command("ACL", "DELUSER", user)
        await admin.execute_command("ACL", "LOG", "RESET")  # the refusals the tests provoked


async def _user_url(redis_url: str, acl_user: tuple[Redis, list[str]], rules: list[str]) -> str:
    admin, users = acl_user
    name, password = f"cli-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)
    users.append(name)
    return redis_url.replace("redis://", f"redis://{name}:{password}@")


async def test_check_passes_for_the_least_privilege_user_before_the_group_starts(
    redis_url: str, acl_user: tuple[Redis, list[str]]
) -> None:
    group = f"t-{uuid.uuid4().hex[:8]}"
    url = await _user_url(redis_url, acl_user, acl_rule(LeaderSettings(group=group)))
    admin, _ = acl_user
    await admin.execute_command("ACL", "LOG", "RESET")
    run = await here("check", "--redis-url", url, "--group", group)
    assert run.code == 0, run
    # It needed nothing beyond the rule: it checks what the nodes will do, with their rights.
    assert await admin.execute_command("ACL", "LOG") == []
    found = _findings(run)
    for topic in ("settings", "redis", "subscribe", "scripts", "keys", "publish"):
        assert found.get(topic) == "ok", run.out
    assert "the scripts read and write" in run.out  # no group ran: the whole cycle was tried
    assert "problem" not in found.values()
    async with Redis.from_url(redis_url) as admin:  # and it left no leader behind
        assert await admin.get(Names("fastapi-leader", group, "-").leader_key) is None


async def test_check_leaves_a_running_group_alone(group: Cluster, redis_url: str) -> None:
    leader = group.leader()
    run = await here("check", "--redis-url", redis_url, "--group", group.group)
    assert run.code == 0, run
    assert "the group is running, so writes were not tried" in run.out
    assert _findings(run)["signing"] == "ok"
    assert group.leader() is leader


@pytest.mark.parametrize(
    ("dropped", "topic"),
    [
        pytest.param("+evalsha", "scripts", id="no-evalsha"),
        pytest.param("+subscribe", "subscribe", id="no-subscribe"),
        pytest.param("+incr", "keys", id="no-incr"),
    ],
)
async def test_check_finds_a_broken_acl_user(
    dropped: str, topic: str, redis_url: str, acl_user: tuple[Redis, list[str]]
) -> None:
    group = f"t-{uuid.uuid4().hex[:8]}"
    rules = [rule for rule in acl_rule(LeaderSettings(group=group)) if rule != dropped]
    url = await _user_url(redis_url, acl_user, rules)
    run = await here("check", "--redis-url", url, "--group", group)
    assert run.code == 1, run
    assert _findings(run)[topic] == "problem", run.out
    assert "Traceback" not in run.out + run.err


async def test_check_finds_a_round_trip_too_slow_for_the_lease(redis_server: RedisServer) -> None:
    proxy = await FaultProxy(redis_server.port).start()
    try:
        proxy.delay(0.1, 0.0)  # each way: a 200 ms round trip, half the default lease
        run = await here("check", "--redis-url", proxy.url, "--group", "slow", steady=False)
    finally:
        await proxy.close()
    assert run.code == 1, run
    [line] = [line for line in run.out.splitlines() if "round trip:" in line]
    assert line.startswith("problem"), run.out
    assert "too slow" in line


async def test_check_finds_a_read_only_replica(
    redis_server: RedisServer, make_redis_server: MakeRedisServer
) -> None:
    replica = make_redis_server(
        extra_args=["--replicaof", redis_server.host, str(redis_server.port)]
    )
    run = await here("check", "--redis-url", replica.url, "--group", "on-a-replica")
    assert run.code == 1, run
    [line] = [line for line in run.out.splitlines() if "topology:" in line]
    assert line.startswith("problem") and "read-only replica" in line, run.out


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        pytest.param(None, "the server requires a password", id="missing"),
        pytest.param("wrong", "wrong user name or password", id="wrong"),
    ],
)
async def test_check_says_what_to_fix_for_a_password(
    password: str | None, expected: str, make_redis_server: MakeRedisServer
) -> None:
    server = make_redis_server(extra_args=["--requirepass", "the-right-one"])
    url = (
        server.url if password is None else server.url.replace("redis://", f"redis://:{password}@")
    )
    run = await here("check", "--redis-url", url)
    assert run.code == 1, run
    [line] = [line for line in run.out.splitlines() if line.startswith("problem")]
    assert line.startswith("problem  redis: ") and expected in line, run.out
    assert "wrong" not in line.split("refused")[0]  # the password is never shown


async def test_check_reports_invalid_settings_as_a_finding() -> None:
    run = await here("check", "--lease", "abc", steady=False)
    assert run.code == 1, run
    assert run.out.startswith("problem  settings: lease='abc' (LEADER_LEASE):"), run.out


# ---- acl, errors, entry points ------------------------------------------------------------------


async def test_acl_prints_the_rule_of_acl_rule() -> None:
    run = await here("acl", "--group", "billing", "--rules-only", steady=False)
    assert run.code == 0, run
    assert run.out.strip() == " ".join(acl_rule(LeaderSettings(group="billing")))
    full = await here("acl", "--group", "billing", "--user", "bill", steady=False)
    assert full.out.startswith("ACL SETUSER bill reset on >PASSWORD resetkeys ")


async def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    run = await cli(
        "status", "--redis-url", "redis://127.0.0.1:1/0", "--timeout", "2", cwd=tmp_path
    )
    line = assert_one_line_error(run)
    assert "127.0.0.1:1" in line


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        pytest.param(
            ("status",),
            {"LEADER_LEASE": "abc"},
            "invalid setting: LEADER_LEASE='abc' (lease):",
            id="env",
        ),
        pytest.param(
            ("status", "--group", "a:b"),
            {},
            "invalid setting: group='a:b' (LEADER_GROUP):",
            id="flag",
        ),
        pytest.param(
            ("watch", "--redis-url", "redis://u:hunter2@127.0.0.1:notaport/0"),
            {},
            "Invalid Redis URL redis://u:***@",
            id="bad-url-hides-password",
        ),
    ],
)
async def test_bad_settings_are_one_line(
    args: tuple[str, ...], env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = assert_one_line_error(await here(*args, steady=False))
    assert expected in line
    assert "hunter2" not in line


def test_console_script_is_installed() -> None:
    script = shutil.which("fastapi-leader", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.fail("the fastapi-leader console script is not installed next to this Python")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result
    for command in ("status", "watch", "resign", "check", "acl"):
        assert command in result.stdout


TIMINGS = ("heartbeat_interval", "lease", "election_timeout_min", "election_timeout_max")


@pytest.mark.parametrize("profile", ["fast", "economy"])
def test_a_profile_flag_gives_the_groups_timings_and_timing_flags_still_win(profile: str) -> None:
    # A group run on economy() beats every 3 s: judged on the default timings, status and
    # watch would call its leader silent between two beats.
    from fastapi_leader.cli import _parser, _settings

    flagged = _settings(_parser().parse_args(["status", "--profile", profile]))
    expected = getattr(LeaderSettings, profile)()
    assert [getattr(flagged, t) for t in TIMINGS] == [getattr(expected, t) for t in TIMINGS]
    lease = expected.lease * 0.9
    overridden = _settings(
        _parser().parse_args(["status", "--profile", profile, "--lease", str(lease)])
    )
    assert overridden.lease == lease
    assert overridden.heartbeat_interval == expected.heartbeat_interval
