"""fastapi-leader: one leader among the replicas of a service, elected over Redis pub/sub.

What it guarantees, and what it does not, is in the docs ("Guarantees and limits",
docs/guarantees.md). In short: at most one node's lease is valid at any instant (its own
monotonic reading, checked at call time), every leadership has a fencing token that only grows,
and a leader that loses Redis steps down before anyone else can win. It cannot stop a paused
process from finishing a write it already began: guard such writes with the fencing token.
"""

from .core import Cause, MemberInfo, Role, Status
from .events import ElectionObserver
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
    leader_router,
    leader_status,
    require_leader,
)
from .leader_only import leader_only
from .messages import RejectReason
from .probes import ProbeResult, liveness, probe_router, readiness
from .service import LeaderElection, NotStarted
from .settings import LeaderSettings, SettingsError
from .transport import (
    BrokerUnavailable,
    MemoryBroker,
    MemoryTransport,
    RedisTransport,
    acl_rule,
)

# The one place the version is written: hatch reads it for the wheel and the sdist
# ([tool.hatch.version] in pyproject.toml), and the package reports it at run time.
__version__ = "0.1.0"

__all__ = [
    "LEADER_ONLY_RESPONSES",
    "BrokerUnavailable",
    "Cause",
    "ElectionObserver",
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
    "ProbeResult",
    "RedisTransport",
    "RejectReason",
    "Role",
    "SettingsError",
    "StaleToken",
    "Status",
    "acl_rule",
    "get_election",
    "leader_lifespan",
    "leader_only",
    "leader_router",
    "leader_status",
    "liveness",
    "probe_router",
    "readiness",
    "require_leader",
]
