"""Set-up that every Ray worker process of an stkd job runs first (Ray's ``worker_process_setup_hook``)."""

from __future__ import annotations

import os

SETUP_HOOK = "pipeline.ray_worker.pin_cluster_address"


def pin_cluster_address() -> None:
    """Name this worker's own cluster in RAY_ADDRESS. Ray Train's PlacementGroupCleaner asks the State
    API whether its controller still lives without saying which cluster it means; the API then looks
    for the one Ray instance on the machine and raises when it finds several (a second local Ray, a
    test suite's), the cleaner's thread dies, and every trial Tune stops leaves its workers' placement
    group behind, holding CPUs until the sweep starves. An address the user set is kept; ``local`` and
    ``auto`` name no cluster (a new one, whichever is running), so they are replaced like no address."""
    import ray

    if os.environ.get("RAY_ADDRESS", "").strip() in ("", "local", "auto"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
