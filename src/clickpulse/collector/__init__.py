"""``clickpulse collector``: the Segment/RudderStack HTTP tracking API in front of ``<ns>.events.raw``.

Point an existing Segment or RudderStack SDK at it (``host``/``dataPlaneUrl`` = the collector's
URL, the write key one of ``CLICKPULSE_COLLECTOR_WRITE_KEYS``) and its events reach the workers
unchanged: each message becomes one record on the raw topic, keyed by its identity key (as
``CLICKPULSE_RAW_KEYED`` expects), with ``receivedAt`` stamped by the collector, answered 200 only
after Kafka acknowledged it. See ``docs/collector.md``.

* :mod:`clickpulse.collector.request` - pure request handling (paths, gzip, auth, limits, records);
* :mod:`clickpulse.collector.server` - the aiohttp server, the producer, ``/health``, ``/metrics``.
"""

from .request import BATCH_CALLS, SINGLE_CALLS, Limits, RequestError, records
from .server import Collector, run, serve

__all__ = ["BATCH_CALLS", "SINGLE_CALLS", "Collector", "Limits", "RequestError", "records", "run", "serve"]
