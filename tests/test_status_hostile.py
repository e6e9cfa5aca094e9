"""`status` on a crafted output: every field it prints goes through printable() (no terminal escapes get out),
and fields of the wrong type are shown, not a traceback; the exit code stays 0, 1 or 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.jobs import REPO

ESC = "\x1b]0;pwned\x07\x1b[2J"


def test_status_of_a_crafted_output_prints_no_escapes_and_no_traceback(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_state.json").write_text(json.dumps({
        "input": f"/photos{ESC}", "format": ESC, "root": "/", "protocol": "file", "layout": {},
        "runs": [{"run": ESC, "started": ESC, "status": f"running{ESC}", "embedded": "many", "wall_s": "long",
                  "img_per_s": ESC, "weights_id": ESC}, "not a run", 7]}))
    (out / "_provenance.json").write_text(json.dumps({"weights_id": ESC, "precision": ["fp32", ESC]}))
    (out / "_lock").write_text(json.dumps({"host": ESC, "pid": ESC, "token": 5, "started": ESC, "heartbeat": "soon"}))
    (out / "_run_report.incomplete.json").write_text(json.dumps({"counts": {"ok": ESC, "failed": [1], "inputs": {}}}))
    for extra in ((), ("--json",)):
        res = subprocess.run([sys.executable, "-m", "resnet_batch.cli", "status", str(out), *extra],
                             capture_output=True, text=True, timeout=120, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert res.returncode in (0, 1, 2), res.stderr
        assert "Traceback" not in res.stderr, res.stderr
        assert "\x1b" not in res.stdout and "\x07" not in res.stdout, repr(res.stdout)
    assert res.returncode == 1


def test_fresh_deletes_only_the_names_this_job_writes_in_its_folders(tmp_path):
    from resnet_batch.output.lock import OutputLock
    from resnet_batch.output.store import OutputStore

    out = tmp_path / "out"
    for d, ours in (("_manifest", "m-000000-000003.parquet"), ("_ledger", "l-0001-000000.parquet"),
                    ("_sync", "drops-0002-00001.parquet")):
        (out / d).mkdir(parents=True)
        (out / d / ours).write_bytes(b"x")
        (out / d / "notes.txt").write_text("someone else's")
    (out / "_state.json").write_text("{}")
    store = OutputStore(str(out), {})
    with OutputLock(store):
        deleted = store.clear()
    assert "_lock" in deleted and "_state.json" in deleted
    for d in ("_manifest", "_ledger", "_sync"):
        assert [p.name for p in (out / d).iterdir()] == ["notes.txt"]
