"""`make cluster-demo` end to end: its entry point (python -m resnet_batch.dev.cluster_demo) starts a real 2-node
Ray cluster on loopback, submits the embed job with `ray job submit`, prints the images per node and stops
every process it started, also when interrupted while the job runs or when the job fails (whose Ray logs
it keeps). ~/.ray is never touched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_ray, pytest.mark.cluster]

REPO = Path(__file__).resolve().parent.parent
PHOTOS = 8


def _env(home: Path) -> dict:
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(home))
    return env


def _demo(photos: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "resnet_batch.dev.cluster_demo", "--photos", str(photos), "-n", str(PHOTOS),
            "--output", str(out), "-o", "input.images_per_shard=2", "-o", "compute.batch_size=2",
            "-o", "compute.decode_batch_size=2"]


def _cluster_root(text: str) -> Path:
    found = re.search(r"temp dirs and auth token under (/\S+?)\)", text)
    assert found, text[-3000:]
    return Path(found.group(1))


def _processes_of(root: Path) -> list[int]:
    """Processes whose environment points at the cluster's token file: every node process and job has it."""
    marker = f"RAY_AUTH_TOKEN_PATH={root / 'auth_token'}".encode()
    pids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
                pids.append(int(p))
        except OSError:
            continue
    return pids


def test_cluster_demo_embeds_on_both_nodes_and_stops_them(tmp_path):
    photos, out, home = tmp_path / "photos", tmp_path / "out", tmp_path / "home"
    res = subprocess.run(_demo(photos, out), cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-5000:]
    assert f"cluster-demo: wrote {PHOTOS} sample photos under {photos}" in text
    assert len(list(photos.rglob("*.jpg"))) == PHOTOS
    assert re.search(r"cluster-demo: \$ RAY_AUTH_TOKEN_PATH=\S+ ray job submit --address http://127\.0\.0\.1:\d+ "
                     r"--working-dir \S+ --submission-id resnet-batch-demo-\S+ -- python jobs/embed\.py", text), text
    assert re.search(r"cluster-demo: job resnet-batch-demo-\S+: SUCCEEDED", text), text[-5000:]
    # the job's own log, streamed: its summary
    assert "resnet-batch: complete" in text and f"images: {PHOTOS} ok, 0 failed" in text and "per node:" in text

    report = json.loads((out / "_run_report.json").read_text())
    assert report["complete"] and report["counts"]["ok"] == PHOTOS
    assert len(report["per_node"]) == 2 and all(n > 0 for n in report["per_node"].values())
    rows = re.findall(r"^  (head|second node) +([0-9a-f]{12}) +([\d,]+) images$", res.stdout, re.M)
    shown = {role: (node, int(n.replace(",", ""))) for role, node, n in rows}
    assert set(shown) == {"head", "second node"}, res.stdout[-3000:]
    assert {node: n for node, n in shown.values()} == {k[:12]: v for k, v in report["per_node"].items()}
    assert sum(n for _, n in shown.values()) == PHOTOS

    root = _cluster_root(text)
    assert "cluster-demo: stopped the 2 node(s) it started" in text
    assert not root.exists()  # temp dirs and token removed
    assert _processes_of(root) == []
    assert not (home / ".ray").exists()  # the token was private; nothing written to the user's ~/.ray


def test_cluster_demo_interrupted_while_the_job_runs_stops_its_nodes(tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to the demo and `ray job submit`) while the job is submitted. The
    demo starts with SIGINT ignored, as a background job of a non-interactive shell does (`make test &`, cron):
    the interrupt was lost there and the job ran to success."""
    photos, out, home = tmp_path / "photos", tmp_path / "out", tmp_path / "home"
    proc = subprocess.Popen(_demo(photos, out), cwd=REPO, env=_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("cluster-demo: $ ") and "ray job submit" in line:
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(seen) + rest
    assert proc.returncode == 130, text[-4000:]
    assert "cluster-demo: interrupted" in text
    root = _cluster_root(text)
    assert "cluster-demo: stopped the 2 node(s) it started" in text, text[-3000:]
    assert not root.exists() and _processes_of(root) == []


def test_cluster_demo_with_a_failing_job_says_so_keeps_ray_logs_and_stops_its_nodes(tmp_path):
    photos, out, home = tmp_path / "photos", tmp_path / "out", tmp_path / "home"
    res = subprocess.run([*_demo(photos, out), "-o", "model.precision=fp8"], cwd=REPO, env=_env(home),
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    text = res.stdout + res.stderr
    assert res.returncode == 1, text[-4000:]
    assert "model.precision" in text  # the job's own error, in its streamed log
    assert re.search(r"cluster-demo: job resnet-batch-demo-\S+: FAILED", text), text[-4000:]
    assert "images per node" not in text
    root = _cluster_root(text)
    try:
        assert "cluster-demo: stopped the 2 node(s) it started" in text
        assert _processes_of(root) == []
        kept = re.search(r"cluster-demo: Ray's logs of both nodes are kept in (\S+)", text)
        assert kept and Path(kept.group(1)) == root / "ray", text[-2000:]
        assert len(list((root / "ray").glob("node*/session_latest/logs/raylet.out"))) == 2
    finally:
        shutil.rmtree(root, ignore_errors=True)
