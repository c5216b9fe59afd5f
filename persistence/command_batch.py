"""Commands packed as they are queued, sent in one write per server, replies parsed by hiredis.

The event worker writes thousands of cache keys per second; redis-py's pipeline spends
several microseconds of Python per command (command stack, callbacks, one
`read_response` per reply). A `CommandBatch` packs each command once, writes them all
in one `send`, and reads the replies later (`InFlight.wait`), so the caller can run the
next batch's SQL meanwhile.

`barrier()`: the commands queued after it run only once every earlier one has, and not
at all after an error reply (the event worker acks entries only after their caches and
dead letters are written). On one server the batch then goes in MULTI/EXEC: a server
that refuses a command as it is queued (full, loading, read-only) runs none of them.
On a Redis Cluster the commands are grouped by the node owning each key's slot: one
write per node and stage, a stage sent once the one before it was answered without an
error (a node still loading after a restart writes none of what follows). A MOVED reply
refreshes the slot map and sends its command to the new owner; an ASK reply sends it,
after ASKING, to the node importing the slot. Neither had run, so nothing runs twice.

A command refused with WRONGTYPE (someone wrote another type of value under one of the
worker's keys) is mended when its part was queued as `whole` (it writes the key's whole
value: a user or session hash): the key is deleted and the part written again, in
MULTI/EXEC, and `replaced` names the key. Any other WRONGTYPE is raised as `WrongType`,
which names the key and carries the commands it refused, to send again once the key is
put right: in an EXEC the other commands ran (the acks among them); on a cluster the
stages after it were not sent.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from hiredis import Reader, pack_command
from redis import Redis
from redis.exceptions import BusyLoadingError, OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from usermgmt.persistence import nodes

MAX_REDIRECTS = 5  # per command: a resharding moves a slot once, a failover once more
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"
# Error replies of a server that cannot serve writes for now: a cluster between a
# master's loss and its replica's promotion (one still loading its data after a restart,
# or at its memory limit, has a redis-py error of its own). An outage to wait out, not a
# failed command: the caller backs off and tries again.
_UNAVAILABLE = ("MASTERDOWN ", "CLUSTERDOWN ", "TRYAGAIN ", "READONLY ")


class RedisUnavailable(RedisConnectionError):
    """The server answered, but cannot serve writes for now (see `_UNAVAILABLE`)."""


class WrongType(ResponseError):
    """Commands met another type of value under keys they do not write whole:
    `refused` holds them (RESP) by key, in the batch's order; `ran_the_rest`: whether the
    batch's other commands, acks included, ran."""

    def __init__(self, message: str, refused: dict[str, list[bytes]], ran_the_rest: bool) -> None:
        super().__init__(
            f"{message} ({'key' if len(refused) == 1 else 'keys'} {', '.join(refused)})"
        )
        self.refused, self.ran_the_rest = refused, ran_the_rest


class Parts:
    """What an in-flight batch keeps of its commands, to mend a key of the wrong type."""

    __slots__ = ("counts", "keys", "parts", "whole")

    def __init__(self, batch: CommandBatch) -> None:
        self.parts, self.keys, self.counts = batch.parts, batch.keys, batch.counts
        self.whole = batch.whole


class CommandBatch:
    """Commands queued for one `send`. Replies come back raw (bytes, ints); an error
    reply does not stop the others from being read, and is raised after them."""

    __slots__ = ("count", "counts", "keys", "parts", "stages", "whole")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.keys: list[str | bytes] = []  # the key of each part (routing on a cluster)
        self.counts: list[int] = []  # how many commands each part holds
        self.stages: list[int] = []  # part indices where a `barrier` starts a stage
        self.whole: set[int] = set()  # parts that write their key's whole value
        self.count = 0

    def add(self, *args: str | bytes | int, whole: bool = False) -> None:
        """Queue one command; its key is its first argument (`HSET key …`, `XACK key …`).
        `whole`: it writes the key's whole value (see the module's WRONGTYPE)."""
        if whole:
            self.whole.add(len(self.parts))
        self.parts.append(pack_command(args))  # type: ignore[arg-type]  # stub: 1-tuple
        self.keys.append(args[1])  # type: ignore[arg-type]  # every command here has a key
        self.counts.append(1)
        self.count += 1

    def add_packed(self, commands: bytes, count: int, key: str | bytes, whole: bool) -> None:
        """Queue `count` commands already in RESP form, all on `key`."""
        if whole:
            self.whole.add(len(self.parts))
        self.parts.append(commands)
        self.keys.append(key)
        self.counts.append(count)
        self.count += count

    def barrier(self) -> None:
        """Commands queued from now on run after every earlier one has been answered."""
        if self.parts and (not self.stages or self.stages[-1] != len(self.parts)):
            self.stages.append(len(self.parts))

    def send(self, client: Redis) -> InFlight | ClusterInFlight:
        """Write every queued command now; read the replies later with `wait`.

        The connection stays out of the pool until then. On a cluster, the first stage
        is written now and the later ones by `wait`.
        """
        sent: InFlight | ClusterInFlight
        if nodes.is_cluster(client):
            sent = ClusterInFlight(client, self)
        else:
            packed = b"".join(self.parts)
            transaction = bool(self.stages)  # a barrier: all or nothing on one server
            sent = InFlight.write(client.connection_pool, packed, self.count, transaction)
            sent.batch = Parts(self)
        self.parts, self.keys, self.counts, self.stages = [], [], [], []
        self.whole, self.count = set(), 0
        return sent


class InFlight:
    """Commands written to one connection whose replies have not been read yet."""

    __slots__ = ("asking", "batch", "conn", "count", "pool", "replaced", "transaction")

    def __init__(
        self, pool: Any, conn: Any, count: int, asking: bool = False, transaction: bool = False
    ) -> None:
        self.pool, self.conn, self.count = pool, conn, count
        self.asking, self.transaction = asking, transaction
        self.batch: Parts | None = None  # set by `CommandBatch.send`
        self.replaced: list[str] = []  # keys of the wrong type, replaced

    @classmethod
    def write(
        cls, pool: Any, packed: bytes, count: int, transaction: bool = False, asking: bool = False
    ) -> InFlight:
        """Take a connection from `pool` and write `packed` (`count` commands) on it.

        `transaction`: in MULTI/EXEC. `asking`: every other command is an ASKING, whose
        replies are not the caller's.
        """
        if not count:
            return cls(pool, None, 0)
        if transaction:
            packed, count = _MULTI + packed + _EXEC, count + 2
        conn = pool.get_connection()
        try:
            conn.send_packed_command([packed], check_health=True)
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        return cls(pool, conn, count, asking, transaction)

    def replies(self) -> list[Any]:
        """Every reply (once), error replies as values; hands the connection back."""
        conn, self.conn = self.conn, None
        if conn is None:
            return []
        try:
            replies = _read_replies(conn, self.count)
            if self.transaction:
                return _executed(replies)
            return replies[1::2] if self.asking else replies
        except BaseException:
            conn.disconnect()  # replies may be left unread
            raise
        finally:
            self.pool.release(conn)

    def abandon(self) -> None:
        """Drop the connection unread (its replies are lost with it)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.disconnect()
            self.pool.release(conn)

    def answered(self) -> bool:
        """Whether the server has begun to answer: reading the replies will not wait long."""
        return self.conn is None or bool(self.conn.can_read(timeout=0))

    def wait(self) -> list[Any]:
        """Every reply; the first error reply is raised once all were read."""
        replies, batch = self.replies(), self.batch
        if _first_error(replies) is not None:
            if batch is not None and any(map(_wrong_type, replies)):
                by_part = _split(replies, batch.counts)
                _mend(batch, by_part, lambda _key: self.pool, self.replaced, ran_the_rest=True)
                replies = [reply for part in by_part for reply in part]
            _raise_first_error(replies)
        return replies


class ClusterInFlight:
    """A batch spread over a cluster's nodes: one `InFlight` per node and stage."""

    def __init__(self, client: Redis, batch: CommandBatch) -> None:
        self.client = client
        self.batch = Parts(batch)
        self.parts, self.keys, self.counts = batch.parts, batch.keys, batch.counts
        self.replaced: list[str] = []  # keys of the wrong type, replaced
        bounds = [0, *batch.stages, len(batch.parts)]
        self.stages = [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        self.replies: list[list[Any]] = [[] for _ in batch.parts]
        self.sent = self._send(self.stages.pop(0)) if self.stages else []

    def wait(self) -> list[Any]:
        """Every reply, in the order queued; the first error reply is raised at the end.

        A stage with an error reply is the last one sent: what was queued after its
        barrier (the acks, after the caches and dead letters) does not run.
        """
        while True:
            self._collect(self.sent)
            replies = [reply for part in self.replies for reply in part]
            error = _first_error(replies)
            if error is not None and any(map(_wrong_type, replies)):
                _mend(self.batch, self.replies, self._pool_for, self.replaced, ran_the_rest=False)
                replies = [reply for part in self.replies for reply in part]
                error = _first_error(replies)
            if not self.stages or error is not None:
                self.stages.clear()
                return _raise_first_error(replies)
            self.sent = self._send(self.stages.pop(0))

    def _pool_for(self, key: str | bytes) -> Any:
        return nodes.pool_for(self.client, key)

    def answered(self) -> bool:
        """Whether every node has begun to answer, with no stage left to send."""
        return not self.stages and all(in_flight.answered() for in_flight, _ in self.sent)

    def abandon(self) -> None:
        """Drop every connection unread and the stages not sent (a crash in tests)."""
        for in_flight, _ in self.sent:
            in_flight.abandon()
        self.stages.clear()

    def _send(self, indices: range | list[int]) -> list[tuple[InFlight, list[int]]]:
        by_node: dict[str, list[int]] = defaultdict(list)
        try:
            for index in indices:
                by_node[nodes.node_name(self.client, self.keys[index])].append(index)
            sent = []
            for group in by_node.values():
                pool = nodes.pool_for(self.client, self.keys[group[0]])
                packed = b"".join(self.parts[index] for index in group)
                count = sum(self.counts[index] for index in group)
                sent.append((InFlight.write(pool, packed, count), group))
            return sent
        except (RedisConnectionError, ConnectionError, OSError):
            nodes.refresh(self.client, force=True)
            raise

    def _collect(self, sent: list[tuple[InFlight, list[int]]]) -> None:
        """Read each node's replies; send redirected commands where they belong."""
        for attempt in range(MAX_REDIRECTS + 1):
            moved: list[int] = []
            try:
                for in_flight, group in sent:
                    replies = in_flight.replies()
                    for index in group:
                        count = self.counts[index]
                        self.replies[index], replies = replies[:count], replies[count:]
                        if any(_redirected(reply) for reply in self.replies[index]):
                            moved.append(index)
            except (RedisConnectionError, ConnectionError, OSError):
                for in_flight, _ in sent:
                    in_flight.abandon()
                nodes.refresh(self.client, force=True)
                raise
            if not moved or attempt == MAX_REDIRECTS:
                return
            sent = self._redirect(moved)

    def _redirect(self, indices: list[int]) -> list[tuple[InFlight, list[int]]]:
        """MOVED: refresh the slot map, send again by it. ASK: ASKING, then the command."""
        asked: list[tuple[InFlight, list[int]]] = []
        moved: list[int] = []
        for index in indices:
            kind, address = next(r for r in map(_redirected, self.replies[index]) if r)
            if kind == "MOVED":
                moved.append(index)
                continue
            pool = nodes.pool_at(self.client, address)
            packed, count = _asking_each(self.parts[index]), 2 * self.counts[index]
            asked.append((InFlight.write(pool, packed, count, asking=True), [index]))
        if moved:
            nodes.refresh(self.client, force=True)
        return asked + (self._send(moved) if moved else [])


def _redirected(reply: Any) -> tuple[str, str] | None:
    """A MOVED or ASK error reply's (kind, address); any other reply, even a value that
    reads like one, is None."""
    return nodes.redirect_of(reply) if isinstance(reply, Exception) else None


def _asking_each(part: bytes) -> bytes:
    """The commands packed in `part`, each after an ASKING (which covers one command)."""
    reader = Reader()
    reader.feed(part)
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(_ASKING + pack_command(tuple(command)))
    return b"".join(commands)


def _wrong_type(reply: Any) -> bool:
    return isinstance(reply, Exception) and str(reply).startswith("WRONGTYPE ")


def _split(replies: list[Any], counts: list[int]) -> list[list[Any]]:
    """Replies in the order queued, as one list per part."""
    by_part, start = [], 0
    for count in counts:
        by_part.append(replies[start : start + count])
        start += count
    return by_part


def _mend(
    batch: Parts,
    by_part: list[list[Any]],
    pool_for: Callable[[str | bytes], Any],
    replaced: list[str],
    ran_the_rest: bool,
) -> None:
    """Replace each key a `whole` part met holding another type: DEL it and write the part
    again, in MULTI/EXEC on the key's server; the part's replies become those. The keys
    replaced are added to `replaced`. Parts that are not `whole` raise `WrongType` once
    the rest is mended, with every refused part of every such key."""
    refused: dict[str, list[bytes]] = {}
    message = ""
    for index, replies in enumerate(by_part):
        wrong = next(filter(_wrong_type, replies), None)
        if wrong is None:
            continue
        key = batch.keys[index]
        name = key.decode() if isinstance(key, bytes) else key
        if index not in batch.whole:
            refused.setdefault(name, []).append(batch.parts[index])
            message = message or str(wrong)
            continue
        packed = pack_command(("DEL", key)) + batch.parts[index]  # type: ignore[arg-type]
        count = batch.counts[index] + 1
        by_part[index] = InFlight.write(pool_for(key), packed, count, transaction=True).wait()[1:]
        replaced.append(name)
    if refused:
        raise WrongType(message, refused, ran_the_rest)


def _executed(replies: list[Any]) -> list[Any]:
    """The replies of the commands between MULTI and EXEC: EXEC's, or, when the server
    ran none (EXECABORT, or MULTI itself refused), what each got as it was queued."""
    executed = replies[-1]
    return executed if isinstance(executed, list) else replies[1:-1]


def _first_error(replies: list[Any]) -> Exception | None:
    return next((reply for reply in replies if isinstance(reply, Exception)), None)


def _raise_first_error(replies: list[Any]) -> list[Any]:
    error = _first_error(replies)
    if error is not None:
        raise error_of(error)
    return replies


def error_of(reply: Exception) -> RedisError:
    """An error reply as the exception redis-py would have raised for it (hiredis gives
    the reply's text only): a server loading, full or between masters cannot serve for
    now (`connections.REDIS_ERRORS`); anything else is a `ResponseError`."""
    if isinstance(reply, RedisError):
        return reply  # read by redis-py already
    text = str(reply)
    if text.startswith("LOADING "):  # worded as redis-py words them
        return BusyLoadingError(text.removeprefix("LOADING "))
    if text.startswith("OOM "):
        return OutOfMemoryError(text.removeprefix("OOM "))
    if text.startswith(_UNAVAILABLE):
        return RedisUnavailable(text)
    return ResponseError(text)


def _read_replies(conn: Any, count: int) -> list[Any]:
    """Parse `count` replies straight off the connection's socket with hiredis.

    redis-py's `read_response` costs several microseconds per reply; one hiredis
    reader fed whole socket reads parses them for a fraction of that.
    """
    sock: Any = getattr(conn, "_sock", None)
    if not hasattr(sock, "recv"):  # not a socket connection (fakeredis in tests)
        return [_read_one(conn) for _ in range(count)]
    reader = Reader()  # error replies come back as ReplyError values, not raised
    replies: list[Any] = []
    while len(replies) < count:
        reply = reader.gets()
        if reply is False:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("Redis closed the connection while replies were pending")
            reader.feed(data)
        else:
            replies.append(reply)
    return replies


def _read_one(conn: Any) -> Any:
    try:
        return conn.read_response(disable_decoding=True)
    except ResponseError as exc:
        return exc


__all__ = ["ClusterInFlight", "CommandBatch", "InFlight", "RedisUnavailable", "WrongType"]
