"""A first run asks for its model actors as soon as Ray is up, before its weights are loaded: the pool takes them
over, and a run that ends before its pool (a refusal) stops them."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from resnet_batch.dev.sample_data import make_sample_photos
from resnet_batch.embed.runner import run
from resnet_batch.errors import WeightsError
from tests.helpers.jobs import REPO, job_config
from tests.helpers.standin import StandInEmbedder

pytestmark = pytest.mark.ray


def test_the_driver_starts_model_actors_without_importing_torch():
    """The actor class and the pool load without torch (the driver imports it once the actors are asked for)."""
    code = ("import sys; import resnet_batch.embed.pool, resnet_batch.embed.dispatch, resnet_batch.embed.model; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"]


def test_a_first_run_asks_for_its_actors_when_ray_is_up_and_its_pool_takes_them(tmp_path, checkpoint, ray_local):
    make_sample_photos(tmp_path / "lib", 6, per_folder=6, seed=41)
    report = run(job_config(tmp_path / "lib", tmp_path / "out", checkpoint), embedder=StandInEmbedder)
    assert report["complete"] and report["counts"]["ok"] == 6
    marks = report["startup"]
    assert marks["ray"] <= marks["actors"] <= marks["pool"] <= marks["first_actor_ready"], marks
    assert marks["actors"] <= marks["weights"] <= marks["pool"], marks  # torch's import after the actors
    assert len(report["actors"]) == 1  # min_actors: the early one, no second actor started by the pool


def _embed_actors() -> dict:
    """Every model actor of the session's Ray and its state, from the GCS's actor table (ray.util.state needs
    the dashboard, which the session's Ray does not run)."""
    from ray._private import state

    return {k: v["State"] for k, v in state.actors().items() if v["ActorClassName"] == "EmbedActor"}


def _wait(condition, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.2)


def test_a_first_run_refused_after_its_actors_were_asked_for_stops_them(tmp_path, ray_local):
    make_sample_photos(tmp_path / "lib", 2, per_folder=2, seed=42)
    before = set(_embed_actors())
    # the error is kept, as a caller that catches it does: its traceback holds the run's frame (and so the
    # actors' handles), so Ray's own clean-up of unreferenced actors cannot be what stops them
    with pytest.raises(WeightsError, match="checkpoint not found") as caught:
        run(job_config(tmp_path / "lib", tmp_path / "out", tmp_path / "missing.pth"))
    new = lambda: {k: v for k, v in _embed_actors().items() if k not in before}  # noqa: E731
    _wait(lambda: new())
    assert len(new()) == 1, new()  # min_actors, asked for before the weights failed to load
    _wait(lambda: set(new().values()) == {"DEAD"})
    assert set(new().values()) == {"DEAD"}, (new(), caught.value)
