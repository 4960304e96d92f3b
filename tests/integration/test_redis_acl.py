"""Each Redis role's exact rights, against a real Redis with the ACL of `policies/redis-acl.json`
(issue 12, finding 16).

One table per role: every command family the role needs, on the keys and channels it uses, is
allowed; a list of commands it must not run is refused. `ACL DRYRUN` asks Redis itself, with the
role's real key, channel and command rules; the refusals are also run for real as the role, except
those that would harm the server if the ACL were wrong. The leased users of the API and the worker
get the same rules (`test_redis_leases.py` checks their creation statements against this file).
"""

from __future__ import annotations

import pytest
import redis

from appliance._stack import RedisHandle

pytestmark = pytest.mark.integration

Command = tuple[str, ...]

#: Key-name listings see the whole keyspace whatever a user's key patterns: admin only.
_LISTINGS: list[Command] = [("SCAN", "0"), ("SCAN", "0", "MATCH", "result:*"), ("KEYS", "*"),
                            ("RANDOMKEY",), ("DBSIZE",)]  # fmt: skip
_ADMIN_ONLY: list[Command] = [
    ("FLUSHALL",),
    ("CONFIG", "GET", "*"),
    ("INFO",),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "x"),
    ("CLIENT", "LIST"),
    ("EVAL", "return 1", "0"),
    ("SCRIPT", "FLUSH"),
    ("GET", "celery-task-meta-x"),
    ("GET", "unprefixed"),
]

ALLOWED: dict[str, list[Command]] = {
    "api": [
        ("PING",),
        ("CLIENT", "SETNAME", "api"),
        ("MULTI",),
        ("WATCH", "pending:k"),
        ("SET", "pending:k", "{}", "EX", "60"),
        ("GET", "result:k"),
        ("PTTL", "result:k"),
        ("DEL", "result:k", "pending:k"),
        ("SET", "nonce:kid:d", "1", "NX", "EX", "300"),
        ("INCRBY", "ratelimit:kid:m:1", "1"),
        ("DECRBY", "ratelimit:kid:m:1", "1"),
        ("EXPIRE", "ratelimit:kid:m:1", "61"),
        ("HSET", "workflow:w", "1", "m"),
        ("EXPIRE", "workflow:w", "60"),
        ("ZCOUNT", "heartbeat:workers", "0", "+inf"),
        ("GET", "registry:generation"),
        ("HGETALL", "storage:kid"),
        ("HDEL", "storage:kid", "f_1_x"),
        ("LPUSH", "celery:appliance", "{}"),
        ("SADD", "celery:_kombu.binding.appliance", "x"),
        ("PUBLISH", "celery:/0.celery.pidbox", "x"),
        ("EVALSHA", "0" * 40, "0"),
        ("SCRIPT", "LOAD", "return 1"),
        ("TIME",),
    ],
    "worker": [
        ("PING",),
        ("SET", "claim:n", "{}", "NX", "EX", "60"),
        ("GET", "claim:n"),
        ("ZADD", "heartbeat:workers", "1", "host:1"),
        ("ZSCORE", "heartbeat:workers", "host:1"),
        ("SET", "result:k", "{}", "EX", "300"),
        ("HSET", "storage:kid", "k", "100"),
        ("EXPIRE", "storage:kid", "300"),
        ("GET", "pending:k"),
        ("SET", "pending:k", "{}", "KEEPTTL"),
        ("DEL", "pending:k"),
        ("HGETALL", "workflow:w"),
        ("HSET", "workflow:w", "ready:1", "m"),
        ("HDEL", "workflow:w", "ready:1", "1"),
        ("LPUSH", "celery:appliance", "{}"),
        ("BRPOP", "celery:appliance", "1"),
        ("HSET", "celery:unacked", "t", "m"),
        ("ZADD", "celery:unacked_index", "1", "t"),
        ("PUBLISH", "celery:/0.celeryev/worker.heartbeat", "x"),
        ("PSUBSCRIBE", "celery:/0.celery.pidbox"),
        ("PSUBSCRIBE", "celery:/0.celeryev/worker.*"),
        ("EVALSHA", "0" * 40, "0"),
        ("TIME",),
    ],
    "flower": [
        ("PING",),
        ("LLEN", "celery:appliance"),
        ("SADD", "celery:_kombu.binding.celeryev", "x"),
        ("SET", "celery:unacked_mutex", "x", "NX", "EX", "5"),
        ("LPUSH", "celery:celeryev.abc", "{}"),
        ("LPUSH", "celery:abc.reply.celery.pidbox", "{}"),
        ("PUBLISH", "celery:/0.celery.pidbox", "x"),
        ("PSUBSCRIBE", "celery:/0.celeryev/*"),
    ],
    "vault": [
        ("PING",),
        ("ACL", "SETUSER", "V_X"),
        ("ACL", "DELUSER", "V_X"),
        ("ACL", "GETUSER", "V_X"),
        ("ACL", "WHOAMI"),
    ],
    "admin": [*_LISTINGS, *_ADMIN_ONLY, ("ZADD", "heartbeat:workers", "1", "h:1")],
}

REFUSED: dict[str, list[Command]] = {
    "api": [
        *_LISTINGS,
        *_ADMIN_ONLY,
        # A stolen API credential must not fake a live worker (or hide a real one).
        ("ZADD", "heartbeat:workers", "9999999999", "fake:1"),
        ("ZREM", "heartbeat:workers", "host:1"),
        ("DEL", "heartbeat:workers"),
        ("ZREMRANGEBYSCORE", "heartbeat:workers", "-inf", "+inf"),
        ("SET", "registry:generation", "g0"),
        ("DEL", "registry:generation"),
        ("GET", "claim:n"),
        ("SET", "claim:n", "{}"),
        ("PUBLISH", "celery:/0.celeryev/worker.heartbeat", "x"),
    ],
    "worker": [
        *_LISTINGS,
        *_ADMIN_ONLY,
        ("GET", "nonce:kid:d"),
        ("INCRBY", "ratelimit:kid:m:1", "1"),
        ("GET", "registry:generation"),
    ],
    "flower": [
        *_LISTINGS,
        *_ADMIN_ONLY,
        ("LPUSH", "celery:appliance", "{}"),
        ("HSET", "celery:unacked", "t", "m"),
        ("GET", "result:k"),
        ("GET", "pending:k"),
        ("HGETALL", "storage:kid"),
        ("ZADD", "heartbeat:workers", "1", "fake:1"),
    ],
    "vault": [
        *_LISTINGS,
        *[c for c in _ADMIN_ONLY if c[:2] != ("ACL", "SETUSER")],
        ("GET", "result:k"),
        ("ACL", "LOG"),
        ("CLIENT", "KILL", "TYPE", "normal"),
        ("CLIENT", "PAUSE", "1"),
    ],
}

#: Run for real only when harmless to the shared server even if the ACL let them through.
_NOT_FOR_REAL = {
    "FLUSHALL",
    "ACL",
    "CLIENT",
    "SCRIPT",
    "EVAL",
    "PSUBSCRIBE",
    "BRPOP",
    "MULTI",
    "WATCH",
}


def _cases(table: dict[str, list[Command]]) -> list[tuple[str, Command]]:
    return [(role, command) for role, commands in table.items() for command in commands]


def _id(case: tuple[str, Command]) -> str:
    role, command = case
    return f"{role}:{' '.join(command[:3])}"


def _dry_run(redis_server: RedisHandle, role: str, command: Command) -> str:
    verdict = redis_server.client("admin").execute_command("ACL", "DRYRUN", role, *command)
    return verdict.decode() if isinstance(verdict, bytes) else str(verdict)


@pytest.mark.parametrize("case", _cases(ALLOWED), ids=_id)
def test_each_role_may_run_what_it_needs(
    redis_server: RedisHandle, case: tuple[str, Command]
) -> None:
    role, command = case
    assert _dry_run(redis_server, role, command) == "OK"


@pytest.mark.parametrize("case", _cases(REFUSED), ids=_id)
def test_each_role_is_refused_the_rest(
    redis_server: RedisHandle, case: tuple[str, Command]
) -> None:
    role, command = case
    assert "no permissions" in _dry_run(redis_server, role, command)
    if command[0] in _NOT_FOR_REAL:
        return
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis_server.client(role).execute_command(*command)


def test_no_service_role_can_list_key_names(redis_server: RedisHandle) -> None:
    """The attack of the review: a service credential listed every key name with SCAN."""
    admin = redis_server.client("admin")
    admin.set("result:acl-probe", "x", ex=60)
    try:
        assert b"result:acl-probe" in set(admin.scan_iter(match="result:acl-probe"))
        for role in ("api", "worker", "flower"):
            with pytest.raises(redis.exceptions.NoPermissionError):
                list(redis_server.client(role).scan_iter(match="*"))
    finally:
        admin.delete("result:acl-probe")


def test_the_api_cannot_fake_a_live_worker(redis_server: RedisHandle) -> None:
    admin, api = redis_server.client("admin"), redis_server.client("api")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            api.zadd("heartbeat:workers", {"fake:1": 9_999_999_999})
        assert admin.zscore("heartbeat:workers", "fake:1") is None
        redis_server.client("worker").zadd("heartbeat:workers", {"real:1": 1})
        assert api.zcount("heartbeat:workers", 0, "+inf") >= 1
    finally:
        admin.zrem("heartbeat:workers", "fake:1", "real:1")
