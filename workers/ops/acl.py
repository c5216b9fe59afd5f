"""Redis ACL rules that keep each game service to the keys it needs (`usermgmt acl`).

Each role is one `ACL SETUSER` line. The lines start with `reset`, so they leave the
user switched off and without a password: turn it on with a password of your own
(`ACL SETUSER <user> on ><password>`) after applying them. Key patterns are built
from the configured prefix, so deployments sharing a Redis stay apart. A role that
needs different commands on different keys gets a selector (in parentheses, Redis
7.0+), so e.g. an auth client can pop reply keys but never XADD to them.

On a Redis Cluster, ACLs are per node: apply the lines on every node (masters and
replicas). Every role may read the slot map (`CLUSTER SLOTS`) and the command table
(`COMMAND`), which cluster clients such as redis-py ask for when they connect.

Known limit: Redis ACLs restrict commands and keys, not a command's options, so a
producer allowed XADD on its stream could also pass `MAXLEN` to trim it.
"""

from __future__ import annotations

from dataclasses import dataclass

from usermgmt.persistence.keys import Keys

ROLES = ("matchmaking", "game-server", "auth-client", "worker")


# Every line starts from nothing; PING and HELLO let a client check its connection,
# SELECT the database its URL names (`redis://…/3`: a client selects it on connecting;
# only that one, as key patterns hold in every database), CLUSTER SLOTS and COMMAND let
# a cluster client find which node holds which key.
def _base(database: int) -> tuple[str, ...]:
    return ("reset", "+ping", "+hello", f"+select|{database}", "+cluster|slots", "+command")


_HASH_READS = "+hget +hmget +hgetall +hexists +exists"
# `usermgmt publish` and the bundled Publisher wrap their XADDs in MULTI/EXEC. These
# touch no key; without them Redis refuses MULTI and then runs the XADDs one by one.
_TRANSACTION = ("+multi", "+exec", "+discard")


@dataclass(frozen=True)
class Role:
    """One service role: who it is for and its ACL rules (the `ACL SETUSER` arguments)."""

    role: str
    user: str
    purpose: str
    rules: tuple[str, ...]

    def setuser(self) -> str:
        """The `ACL SETUSER` command line for redis-cli (a selector quoted as one argument)."""
        words = [f'"{rule}"' if " " in rule else rule for rule in self.rules]
        return " ".join(("ACL", "SETUSER", self.user, *words))


def roles(keys: Keys, user_prefix: str | None = None, database: int = 0) -> list[Role]:
    """The four roles for the streams and caches under `keys.prefix`, in `database` (the
    number `USERMGMT_REDIS_URL` names; 0 on a cluster)."""
    prefix = keys.prefix
    names = user_prefix if user_prefix is not None else f"{prefix}-"
    base = _base(database)
    return [
        Role(
            "matchmaking",
            f"{names}matchmaking",
            "XADD session updates; read cached users and live sessions",
            (
                *base,
                f"~{keys.update_stream}",
                "+xadd",
                *_TRANSACTION,
                f"(%R~{prefix}:user:* %R~{prefix}:session:* {_HASH_READS})",
            ),
        ),
        Role(
            "game-server",
            f"{names}game-server",
            "XADD game results (terminate events)",
            (*base, f"~{keys.terminate_stream}", "+xadd", *_TRANSACTION),
        ),
        Role(
            "auth-client",
            f"{names}auth-client",
            "XADD auth requests; pop their replies",
            (*base, f"~{keys.auth_requests}", "+xadd", f"(~{prefix}:auth:reply:* +blpop +lpop)"),
        ),
        Role(
            "worker",
            f"{names}worker",
            "run `usermgmt worker` and the operator commands: every key under the prefix, "
            "no administrative or dangerous command",
            (
                *base,
                f"~{prefix}:*",
                "+@read",
                "+@write",
                "+@stream",
                "+@hash",
                "+@list",
                "+@sortedset",
                "+@string",
                "+@keyspace",
                "+@transaction",
                "-@dangerous",
                "-@admin",
                # FUNCTION FLUSH/LOAD/DELETE/RESTORE are @write but act on the whole
                # server's code, which other applications may use; the worker runs no
                # script. MOVE and COPY ... DB write into other databases.
                "-@scripting",
                "-move",
                "-copy",
                "+time",
                "+info",  # to warn when Redis evicts keys (`maxmemory-policy`)
            ),
        ),
    ]
