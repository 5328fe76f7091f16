"""The one way this package gets a Dask client: an existing scheduler, or a local cluster.

Ingest and discover both spread work over Dask workers; both accept ``--workers N`` (a
LocalCluster of N one-thread processes) or ``--scheduler tcp://HOST:PORT`` (a cluster started
elsewhere whose workers see the same filesystem).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from spectransfer.errors import StoreError

log = logging.getLogger(__name__)


@contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """Yield a Dask client on ``scheduler`` or on a LocalCluster of ``workers`` processes."""
    from dask.distributed import Client, LocalCluster

    # Dask's INFO chatter (scheduler/nanny start and stop) drowns the progress bar.
    if not logging.getLogger("spectransfer").isEnabledFor(logging.DEBUG):
        logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise StoreError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    else:
        n = int(workers or 1)
        try:
            cluster = LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
            )
        except (OSError, RuntimeError, TimeoutError) as exc:
            raise StoreError(f"cannot start a local Dask cluster of {n} workers: {exc}") from exc
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
