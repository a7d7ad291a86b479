"""fastapi-leader: one leader among the replicas of a service, elected over Redis pub/sub.

What it guarantees, and what it does not, is in the README ("Guarantees"). In short: at most one
node's lease is valid at any instant (its own monotonic reading, checked at call time), every
leadership has a fencing token that only grows, and a leader that loses Redis steps down before
anyone else can win. It cannot stop a paused process from finishing a write it already began:
guard such writes with the fencing token.
"""

from .core import MemberInfo, Role, Status
from .fencing import Fence, FencedScript, StaleToken
from .integration import (
    LEADER_ONLY_RESPONSES,
    LeaderElectionDep,
    LeaderStatus,
    LeaderStatusDep,
    MemberStatus,
    NotLeader,
    get_election,
    leader_lifespan,
    leader_only,
    leader_router,
    leader_status,
    require_leader,
)
from .messages import RejectReason
from .service import LeaderElection, NotStarted
from .settings import LeaderSettings
from .transport import (
    BrokerUnavailable,
    MemoryBroker,
    MemoryTransport,
    RedisTransport,
    acl_rule,
)

__all__ = [
    "LEADER_ONLY_RESPONSES",
    "BrokerUnavailable",
    "Fence",
    "FencedScript",
    "LeaderElection",
    "LeaderElectionDep",
    "LeaderSettings",
    "LeaderStatus",
    "LeaderStatusDep",
    "MemberInfo",
    "MemberStatus",
    "MemoryBroker",
    "MemoryTransport",
    "NotLeader",
    "NotStarted",
    "RedisTransport",
    "RejectReason",
    "Role",
    "StaleToken",
    "Status",
    "acl_rule",
    "get_election",
    "leader_lifespan",
    "leader_only",
    "leader_router",
    "leader_status",
    "require_leader",
]
