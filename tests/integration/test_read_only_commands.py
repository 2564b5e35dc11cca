"""Read-only commands against the real broker: they never create a topic (a broker with
``auto.create.topics.enable`` creates a topic a client merely asks metadata about)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from clickpulse.cli import main
from clickpulse.settings import Settings

pytestmark = pytest.mark.integration


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_report_experiments_on_an_empty_namespace_creates_no_topic(local_services: Settings, monkeypatch,
                                                                   capsys) -> None:
    ns = f"it-ro-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("CLICKPULSE_KAFKA_BOOTSTRAP", local_services.kafka_bootstrap)
    monkeypatch.setenv("CLICKPULSE_NAMESPACE", ns)
    assert main(["report", "experiments", "--timeout", "10"]) == 0
    assert f"0 records from {ns}.experiments" in capsys.readouterr().out
    assert main(["quarantine", "list", "--timeout", "10"]) == 0
    assert not {t for t in asyncio.run(_topics(local_services.kafka_bootstrap)) if t.startswith(ns)}


def test_a_collector_whose_port_is_taken_closes_its_producer(local_services: Settings) -> None:
    """The site fails to bind after the producer started connecting: no unclosed producer is left
    (aiokafka warns "Unclosed AIOKafkaProducer" from its finalizer)."""
    import gc
    import socket
    import warnings

    from clickpulse.collector.server import serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        s = local_services.replace(namespace=f"it-ro-{uuid.uuid4().hex[:10]}", collector_port=busy.getsockname()[1],
                                   collector_write_keys="k" * 20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(OSError):
                asyncio.run(serve(s))
            gc.collect()
    assert not [w for w in caught if "Unclosed AIOKafkaProducer" in str(w.message)]
