"""``clickpulse topics list|clean`` and topic creation against the real broker and Redis: a
namespace's topics, consumer groups and Redis keys go (after a dry run), nobody else's; a running
consumer blocks the clean; partition and replication settings give clear errors."""

from __future__ import annotations

import asyncio

import pytest
import redis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from clickpulse.cli import EXIT_INVALID, EXIT_UNAVAILABLE, main
from clickpulse.errors import ConfigError
from clickpulse.settings import Settings
from clickpulse.topics import ensure_topics, topic_specs

from .conftest import wait_for

pytestmark = pytest.mark.integration


async def _topics(s: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def _groups(s: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        return {g for g, _p in await admin.list_consumer_groups()}
    finally:
        await admin.close()


async def _commit_group(s: Settings, group: str) -> None:
    """A consumer group of the namespace with a committed offset, then left (an empty group)."""
    c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        c.assign([TopicPartition(s.topic_actions, 0)])
        await c.commit({TopicPartition(s.topic_actions, 0): 0})
    finally:
        await c.stop()


def ns_topics(s: Settings) -> set[str]:
    return {t for t in asyncio.run(_topics(s)) if t.startswith(s.namespace + ".") or t.startswith(s.app_id + "-")}


@pytest.fixture
def cli_env(monkeypatch, local_services: Settings):
    monkeypatch.setenv("CLICKPULSE_KAFKA_BOOTSTRAP", local_services.kafka_bootstrap)
    monkeypatch.setenv("CLICKPULSE_REDIS_URL", local_services.redis_url)


def test_clean_deletes_one_namespace_after_a_dry_run(make_settings, cli_env, capsys):
    s, other = make_settings(), make_settings()
    asyncio.run(_commit_group(s, f"{s.namespace}-delivery"))
    asyncio.run(_commit_group(other, f"{other.namespace}-delivery"))
    r = redis.Redis.from_url(s.redis_url)
    r.set(f"{s.namespace}:profile:u1", b"{}")
    r.set(f"{s.namespace}:delivered:a1", b"1")
    r.set(f"{other.namespace}:profile:u1", b"{}")
    want = set(topic_specs(s))
    assert ns_topics(s) == want

    assert main(["topics", "list", "--namespace", s.namespace]) == 0
    listed = capsys.readouterr().out
    assert all(f"{s.namespace}\t{t}\t{spec['partitions']} partition" in listed
               for t, spec in topic_specs(s).items()) and f"{s.namespace}-delivery\tconsumer group" in listed
    assert other.namespace not in listed

    # dry run: lists, deletes nothing
    assert main(["topics", "clean", "--namespace", s.namespace, "--redis"]) == 0
    out = capsys.readouterr().out
    assert f"namespace {s.namespace}: {len(want)} topics, 1 consumer group, 2 Redis keys" in out
    assert "dry run: nothing deleted" in out and other.namespace not in out
    assert ns_topics(s) == want and r.exists(f"{s.namespace}:profile:u1")

    assert main(["topics", "clean", "--namespace", s.namespace, "--redis", "--yes"]) == 0
    assert f"namespace {s.namespace}: deleted" in capsys.readouterr().out
    wait_for(lambda: not ns_topics(s), 60, "the namespace's topics to be deleted")
    assert f"{s.namespace}-delivery" not in asyncio.run(_groups(s))
    assert not r.exists(f"{s.namespace}:profile:u1", f"{s.namespace}:delivered:a1")
    # the other namespace is untouched
    assert ns_topics(other) == set(topic_specs(other))
    assert f"{other.namespace}-delivery" in asyncio.run(_groups(other))
    assert r.exists(f"{other.namespace}:profile:u1")
    r.delete(f"{other.namespace}:profile:u1")

    # nothing left: a clean is a no-op
    assert main(["topics", "clean", "--namespace", s.namespace, "--yes"]) == 0
    assert "nothing to delete" in capsys.readouterr().out
    assert main(["topics", "clean", "--namespace", other.namespace, "--yes"]) == 0


def test_clean_is_refused_while_a_consumer_of_the_namespace_runs(make_settings, cli_env, capsys):
    s = make_settings()
    # an idle group of the namespace (committed offsets, no members): it must survive the refused clean
    asyncio.run(_commit_group(s, f"{s.namespace}-trainer"))

    async def scenario() -> int:
        c = AIOKafkaConsumer(s.topic_actions, bootstrap_servers=s.kafka_bootstrap, group_id=f"{s.namespace}-delivery",
                             enable_auto_commit=False, session_timeout_ms=10000, heartbeat_interval_ms=1000)
        await c.start()
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while not c.assignment() and asyncio.get_running_loop().time() < deadline:
                await c.getmany(timeout_ms=200)  # joins the group
            assert c.assignment(), "the consumer never joined its group"
            return await asyncio.to_thread(main, ["topics", "clean", "--namespace", s.namespace, "--yes"])
        finally:
            await c.stop()

    assert asyncio.run(scenario()) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"group {s.namespace}-delivery has members (its processes are running): stop them first; " \
           "nothing was deleted" in err
    assert ns_topics(s) == set(topic_specs(s))
    assert f"{s.namespace}-trainer" in asyncio.run(_groups(s))  # checked before any group was deleted
    # once it stopped, the clean goes through
    assert main(["topics", "clean", "--namespace", s.namespace, "--yes"]) == 0
    wait_for(lambda: not ns_topics(s), 60, "the namespace's topics to be deleted")


def test_more_partitions_than_the_topics_have_is_a_formatted_error(make_settings, cli_env, monkeypatch, capsys,
                                                                  tmp_path):
    s = make_settings()  # 4 partitions
    with pytest.raises(ConfigError) as exc:
        asyncio.run(ensure_topics(s.replace(partitions=8)))
    msg = str(exc.value)
    assert "{" not in msg and "has 4 partitions but CLICKPULSE_PARTITIONS/settings want 8" in msg
    assert msg.endswith("(use a new CLICKPULSE_NAMESPACE or set CLICKPULSE_PARTITIONS=4)")
    # the same through the command line: one line, exit 2
    monkeypatch.setenv("CLICKPULSE_NAMESPACE", s.namespace)
    monkeypatch.setenv("CLICKPULSE_PARTITIONS", "8")
    events = tmp_path / "events.jsonl"
    events.write_text('{"type":"page_view","user_id":"u1","timestamp":1569888000000}\n')
    assert main(["replay", "--format", "jsonl", str(events)]) == EXIT_INVALID
    err = capsys.readouterr().err.strip()
    assert err.startswith("clickpulse: error: topic ") and err.endswith("set CLICKPULSE_PARTITIONS=4)")
    assert main(["topics", "clean", "--namespace", s.namespace, "--yes"]) == 0


def test_replication_factor_is_used_and_checked_against_the_brokers(make_settings, cli_env):
    s = make_settings(replication_factor=1)
    ns_topics_now = ns_topics(s)

    async def replicas() -> set[int] | None:
        """Replica counts of the namespace's partitions; None until every topic's metadata is in
        (a just-created topic may be listed before its partitions)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
        await admin.start()
        try:
            desc = await admin.describe_topics(sorted(ns_topics_now))
        finally:
            await admin.close()
        pending = {d["topic"]: (d["error_code"], len(d["partitions"])) for d in desc
                   if d["error_code"] != 0 or not d["partitions"]}
        if pending:
            last[:] = [pending]
            return None
        return {len(p["replicas"]) for d in desc for p in d["partitions"]}
    last: list = []
    try:
        got = wait_for(lambda: asyncio.run(replicas()), 180, "the new topics' metadata")
    except AssertionError as err:  # say which topics (error code, partitions) were still missing
        raise AssertionError(f"{err}; last answer {last} for {sorted(ns_topics_now)}") from None
    assert got == {1}
    # the local cluster has one broker: three copies cannot be placed, and the error says why
    bad = s.replace(namespace=s.namespace + "-rf3", replication_factor=3)
    with pytest.raises(ConfigError, match=r"replication factor 3 \(CLICKPULSE_REPLICATION_FACTOR\): "
                                          r"InvalidReplicationFactorError: .*only 1 broker"):
        asyncio.run(ensure_topics(bad))
    assert not ns_topics(bad)
    assert main(["topics", "clean", "--namespace", s.namespace, "--yes"]) == 0


def test_group_committed_reads_the_workers_commit_from_the_broker(make_settings):
    """What the input-gap check asks the broker when Faust does not know a partition's commit yet."""
    from clickpulse.app import group_committed
    s = make_settings()
    assert asyncio.run(group_committed(s, s.topic_raw, 0)) is None       # nothing committed yet

    async def commit() -> None:
        c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=s.app_id, enable_auto_commit=False)
        await c.start()
        try:
            c.assign([TopicPartition(s.topic_raw, 0)])
            await c.commit({TopicPartition(s.topic_raw, 0): 0})
        finally:
            await c.stop()
    asyncio.run(commit())
    assert asyncio.run(group_committed(s, s.topic_raw, 0)) == 0
    assert asyncio.run(group_committed(s, s.topic_raw, 1)) is None
