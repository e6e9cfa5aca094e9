"""Hostile input and operator mistakes on the embed pipeline (issue 11): names no listed path is globbed
for, names that are not UTF-8, broken shards, archive bombs, foreign files in the output, overlapping
folders, two runs at once. Each case: rows and counts, or a refusal with its message and exit code, and
nothing deleted that the job did not write."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from resnet_batch.config import InputConfig
from resnet_batch.errors import LockedError, OutputError
from resnet_batch.output.lock import Holder, OutputLock
from tests.helpers.shards import list_shards
from resnet_batch.embed.reader import ReadSettings, read_shard
from resnet_batch.embed.runner import run
from resnet_batch.dev.sample_data import jpeg_bytes, source_photos, variant
from resnet_batch.schema import CONTROL_END, PASSTHROUGH_PREFIX
from resnet_batch.output.store import OutputStore
from tests.helpers.jobs import REPO, job_config

GLOB_NAMES = ["trip [2024]/IMG [edited].jpg", "trip [2024]/a?b.jpg", "*.jpg", "{x,y}.jpg", "star*dust/[!a].jpg"]


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return jpeg_bytes(variant(source_photos()["coffee"], rng), 85)


def _rows(out: Path) -> dict[str, dict]:
    t = pads.dataset(str(out), format="parquet").to_table(columns=["image_id", "status", "error", "path"])
    ids = t.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "an image appears twice"
    return {r["image_id"]: r for r in t.to_pylist()}


def _read(cfg: InputConfig) -> tuple[list[dict], dict]:
    """Every row the read tasks would hand over (bytes kept), and {shard: (images, skipped)}."""
    fmt, listing, shards, _ = list_shards(cfg)
    from resnet_batch.embed.reader import WDS_FIELDS

    extra = tuple(WDS_FIELDS) if fmt == "webdataset" else ()
    s = ReadSettings(listing.root, listing.protocol, cfg.uri, dict(cfg.storage_options), cfg.extensions,
                     cfg.image_column, extra, cfg.max_bytes, cfg.images_per_shard, 4, 5.0, decode=lambda t: t)
    rows, ends = [], {}
    for shard in shards:
        n = 0
        for t in read_shard(shard, s):
            for r in t.to_pylist():
                if r["status"] == CONTROL_END:
                    ends[r["_shard"]] = (n, r["_skipped"])
                elif r["status"] != "_failure":
                    rows.append(r)
                    n += 1
    return rows, ends


# -- names ---------------------------------------------------------------------------------------


def test_glob_characters_in_names_are_plain_names(tmp_path, jpeg, checkpoint, ray_local):
    root = tmp_path / "in"
    for name in GLOB_NAMES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(jpeg)
    (root / "other.jpg").write_bytes(jpeg)  # what '*.jpg' would expand to, if anything globbed it
    out = tmp_path / "out"
    report = run(job_config(root, out, checkpoint, input={"images_per_shard": 3}))
    rows = _rows(out)
    assert set(rows) == set(GLOB_NAMES) | {"other.jpg"} and {r["status"] for r in rows.values()} == {"ok"}
    assert report["counts"]["ok"] == len(GLOB_NAMES) + 1 and report["complete"]
    assert rows["trip [2024]/IMG [edited].jpg"]["path"] == str(root / "trip [2024]/IMG [edited].jpg")


@pytest.mark.s3
def test_glob_characters_in_keys_on_s3(s3_server, jpeg):
    s3_server.make_bucket("hostile-glob")
    fs = s3_server.filesystem()
    fs.pipe({f"hostile-glob/in/{n}": jpeg for n in GLOB_NAMES} | {"hostile-glob/in/zzz/big.jpg": jpeg * 50})
    cfg = InputConfig(uri="s3://hostile-glob/in", storage_options=s3_server.storage_options(), images_per_shard=10)
    rows, _ = _read(cfg)
    got = {r["image_id"]: r for r in rows}
    assert set(got) == set(GLOB_NAMES) | {"zzz/big.jpg"}
    assert all(r["status"] == "ok" and r["bytes"] == jpeg for i, r in got.items() if i != "zzz/big.jpg")


def test_names_that_are_not_utf8(tmp_path, jpeg):
    root = tmp_path / "in"
    root.mkdir()
    raw = os.fsencode(str(root)) + b"/caf\xe9-\xff.jpg"
    with open(raw, "wb") as f:
        f.write(jpeg)
    tar = root / "s.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as t:
        info = tarfile.TarInfo(os.fsdecode(b"k\xe9y.jpg"))
        info.size = len(jpeg)
        t.addfile(info, io.BytesIO(jpeg))
    rows, _ = _read(InputConfig(uri=str(root), format="folder"))
    assert [(r["image_id"], r["status"]) for r in rows] == [("caf\\xe9-\\xff.jpg", "ok")]
    assert rows[0]["bytes"] == jpeg
    rows, ends = _read(InputConfig(uri=str(root), format="webdataset"))
    assert [(r["image_id"], r["status"]) for r in rows] == [("s.tar/k\\xe9y", "ok")] and ends == {0: (1, 0)}


# -- broken shards ---------------------------------------------------------------------------------


def test_broken_parquet_shards_become_rows(tmp_path, jpeg):
    root = tmp_path / "pq"
    root.mkdir()
    good = pa.table({"key": ["a", "a", None, "b"], "jpg": [jpeg, jpeg, jpeg, jpeg],
                     "bytes": ["x", "y", "z", "w"], "_shard": [7, 7, 7, 7]})
    pq.write_table(good, root / "0-good.parquet")
    data = (root / "0-good.parquet").read_bytes()
    (root / "1-truncated.parquet").write_bytes(data[: len(data) // 2])
    (root / "2-empty.parquet").write_bytes(b"")
    pq.write_table(pa.table({"key": ["c"], "jpg": [12345]}), root / "3-int-image.parquet")
    cfg = InputConfig(uri=str(root), passthrough_columns=("bytes", "_shard"))
    fmt, listing, shards, _ = list_shards(cfg)
    assert fmt == "parquet" and len(shards) == 4
    s = ReadSettings(listing.root, listing.protocol, cfg.uri, {}, cfg.extensions, "jpg",
                     (pa.field("bytes", pa.string()), pa.field("_shard", pa.int64())), cfg.max_bytes, 100, 4, 5.0,
                     decode=lambda t: t)
    rows = [r for shard in shards for t in read_shard(shard, s) for r in t.to_pylist() if r["status"] != CONTROL_END]
    by_id = {r["image_id"]: r for r in rows}
    # duplicate and null keys still give unique ids; pass-through columns named like internal ones survive
    assert [i for i in by_id if i.startswith("0-good")] == ["0-good.parquet/a", "0-good.parquet/a#2",
                                                            "0-good.parquet/000000002", "0-good.parquet/b"]
    assert [by_id[f"0-good.parquet/{k}"][PASSTHROUGH_PREFIX + "bytes"] for k in ("a", "a#2", "b")] == ["x", "y", "w"]
    assert by_id["0-good.parquet/a"][PASSTHROUGH_PREFIX + "_shard"] == 7 and by_id["0-good.parquet/a"]["_shard"] == 0
    assert by_id["1-truncated.parquet"]["status"] == "read_error"
    assert by_id["1-truncated.parquet"]["error"].startswith("parquet shard unreadable:")
    assert by_id["2-empty.parquet"]["status"] == "read_error"
    assert by_id["3-int-image.parquet/c"]["error"].endswith("image column 'jpg' holds int64, not image bytes "
                                                            "(input.image_column)")


def test_tar_with_repeated_keys_and_two_images_under_one_key(tmp_path, jpeg):
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "s.tar", "w") as t:
        for name, data in (("k1.jpg", jpeg), ("k1.png", jpeg), ("k2.jpg", jpeg), ("k1.jpg", jpeg),
                           ("notes.txt", b"x" * 10), ("k3.bin", b"\0" * 100)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    rows, ends = _read(InputConfig(uri=str(root)))
    assert [r["image_id"] for r in rows] == ["s.tar/k1", "s.tar/k1.png", "s.tar/k2", "s.tar/k1#2"]
    assert ends == {0: (4, 2)}  # the .txt-only sample and the .bin member are counted as skipped


# -- bombs -------------------------------------------------------------------------------------------

_PEAK = """
import sys
from resnet_batch.config import InputConfig
from tests.helpers.shards import list_shards
from resnet_batch.embed.reader import ReadSettings, read_shard
from resnet_batch.embed.reader import WDS_FIELDS
from resnet_batch.decode import PreprocessSpec, decode_table
import functools
cfg = InputConfig(uri=sys.argv[1])
fmt, listing, shards, _ = list_shards(cfg)
spec = PreprocessSpec(232, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # what a read task is handed
decode = functools.partial(decode_table, spec=spec, max_pixels=10**8, draft=True)
s = ReadSettings(listing.root, listing.protocol, cfg.uri, {}, cfg.extensions, cfg.image_column,
                 tuple(WDS_FIELDS) if fmt == "webdataset" else (), cfg.max_bytes, 1000, 16, 5.0, decode=decode)
rows = [(r["image_id"], r["status"], r["error"]) for sh in shards for t in read_shard(sh, s) for r in t.to_pylist()
        if r["status"] != "_end"]
print(repr(rows))
# VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at fork)
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def _read_in_child(root: Path) -> tuple[list, int]:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(root)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    return eval(lines[-2]), int(lines[-1])  # noqa: S307 (our own child's repr)


def test_archive_bombs_are_refused_with_bounded_memory(tmp_path, jpeg, capsys):
    """A 400 MB zero-filled member in a .tgz (as an image and as an ignored file) and a Parquet row group of
    16 huge values: every read task stays under 300 MB, and the oversized values are read_error rows."""
    big = 400 << 20
    tgz = tmp_path / "tgz"
    tgz.mkdir()

    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    with tarfile.open(tgz / "bomb.tgz", "w:gz") as t:
        for name in ("zeros.jpg", "zeros.bin"):
            info = tarfile.TarInfo(name)
            info.size = big
            t.addfile(info, io.BufferedReader(Zeros(big)))
        info = tarfile.TarInfo("fine.jpg")
        info.size = len(jpeg)
        t.addfile(info, io.BytesIO(jpeg))
    assert (tgz / "bomb.tgz").stat().st_size < 2 << 20
    rows, tar_peak = _read_in_child(tgz)
    assert [(i, s) for i, s, _ in rows] == [("bomb.tgz/zeros", "read_error"), ("bomb.tgz/fine", "ok")]
    assert rows[0][2] == f"tar member is {big} bytes, over input.max_bytes ({64 << 20}); not read"

    pqdir = tmp_path / "pq"
    pqdir.mkdir()
    rng = np.random.default_rng(0)
    huge = [rng.bytes(18 << 20) for _ in range(15)] + [jpeg]  # 286 MB in one row group of 16 rows
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(16)], "jpg": huge}), pqdir / "rg.parquet",
                   row_group_size=16, compression="none", use_dictionary=False)
    # one 4 MB value on 2,000 rows of a dictionary-encoded column: a 4 MB file, 8 GB if materialised
    one = pa.DictionaryArray.from_arrays(pa.array(np.zeros(2000, np.int32)), pa.array([rng.bytes(4 << 20)]))
    pq.write_table(pa.table({"key": [f"d{i}" for i in range(2000)], "jpg": one}), pqdir / "dict.parquet")
    assert (pqdir / "dict.parquet").stat().st_size < 5 << 20
    rows, pq_peak = _read_in_child(pqdir)
    by_file = {f: [(i, s, e) for i, s, e in rows if i.startswith(f)] for f in ("rg.parquet", "dict.parquet")}
    assert [s for _, s, _ in by_file["rg.parquet"]] == ["read_error"] * 16
    assert by_file["rg.parquet"][0][2].startswith("row group 0 holds ")
    assert "more than a read task buffers (100663296); not read: rewrite the file with smaller row groups" in \
        by_file["rg.parquet"][0][2]
    assert len(by_file["dict.parquet"]) == 2000  # each a decode_error (random bytes), none materialised twice
    assert {(s, e) for _, s, e in by_file["dict.parquet"]} == {("decode_error", "not an image (format not recognised)")}
    with capsys.disabled():
        print(f"\n[hostile] read task peak RSS: tgz bomb {tar_peak / 2**20:.0f} MB, Parquet bombs (286 MB row "
              f"group, 8 GB dictionary) {pq_peak / 2**20:.0f} MB")
    assert tar_peak < 300 << 20 and pq_peak < 300 << 20


# -- the output folder -------------------------------------------------------------------------------


def _cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "resnet_batch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_input_and_output_must_not_overlap(tmp_path, jpeg):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg)
    for out, what in ((root, "the input folder itself"), (root / "emb", "inside the input folder"),
                      (tmp_path, "a folder that holds the input")):
        res = _cli("embed", "--input", str(root), "--output", str(out), "--fresh", "-o", "model.weights=random")
        assert res.returncode == 2, res.stderr
        assert f"error: output.uri {out} is {what} ({root})" in res.stderr
    assert sorted(p.name for p in root.iterdir()) == ["a.jpg"]  # --fresh deleted nothing


def test_fresh_refuses_a_foreign_folder_and_a_foreign_part_is_named(tmp_path, jpeg, checkpoint, ray_address):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg)
    spark = tmp_path / "spark"
    spark.mkdir()
    for name in ("_SUCCESS", "part-00000-1b2c.snappy.parquet", "part-000000.parquet"):
        (spark / name).write_text("theirs")
    res = _cli("embed", "--input", str(root), "--output", str(spark), "--fresh", "-o", f"model.weights={checkpoint}")
    assert res.returncode == 2 and "is not a resnet-batch output" in res.stderr
    assert sorted(p.name for p in spark.iterdir()) == ["_SUCCESS", "part-00000-1b2c.snappy.parquet",
                                                       "part-000000.parquet"]
    out = tmp_path / "out"
    args = ("embed", "--quiet", "--input", str(root), "--output", str(out), "-o", f"model.weights={checkpoint}",
            "-o", "model.precision=fp32")
    assert _cli(*args, env=ray_address).returncode == 0
    (out / "part-000009.parquet").write_bytes(b"someone's file")
    (out / "notes.txt").write_text("mine")
    res = _cli(*args)
    assert res.returncode == 2
    assert f"error: {out}/part-000009.parquet is not a readable Parquet part" in res.stderr
    assert "move it out of the output folder, or rerun with --fresh" in res.stderr
    res = _cli(*args, "--fresh", env=ray_address)
    assert res.returncode == 0, res.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "_SUCCESS").exists()


def test_a_second_run_on_the_same_output_is_refused_naming_the_holder(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    with OutputLock(store):
        with pytest.raises(LockedError, match=rf"is in use by another run \(pid {os.getpid()} on "):
            OutputLock(store).acquire()
        holder = OutputLock(store).read()
        assert holder.pid == os.getpid()
    assert OutputLock(store).read() is None  # released


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    me = Holder.me()  # a holder of this very boot and pid namespace, as the lock records one, whose pid is gone
    store.write("_lock", {"host": me.host, "pid": int(dead), "token": "t", "started": time.time(),
                          "heartbeat": time.time(), "boot": me.boot, "pidns": me.pidns, "start_ticks": 12345})
    said = []
    with OutputLock(store, on_takeover=said.append) as lock:
        assert lock.read().pid == os.getpid()
    assert said and said[0].startswith(f"taking over a stale lock on {tmp_path / 'out'} (pid {dead} on ")


@pytest.mark.ray
def test_two_concurrent_cli_runs(tmp_path, jpeg, checkpoint, ray_address):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(24):
        (root / f"{i:02d}.jpg").write_bytes(jpeg)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "resnet_batch.cli", "embed", "--quiet", "--input", str(root), "--output", str(out),
            "-o", f"model.weights={checkpoint}", "-o", "compute.torch_threads=1", "-o", "input.images_per_shard=4"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO), **ray_address})
    deadline = time.time() + 120
    while not (out / "_lock").exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = _cli(*args[3:], "-o", "model.precision=fp32")
    assert second.returncode == 2
    assert f"error: output {out} is in use by another run (pid {first.pid} on " in second.stderr
    assert first.wait(timeout=300) == 0
    assert json.loads((out / "_SUCCESS").read_text())["ok"] == 24


def test_mid_run_failures_are_exit_1_and_refusals_exit_2(monkeypatch, tmp_path, capsys):
    import resnet_batch.embed.runner as runner
    from resnet_batch.cli import main
    from resnet_batch.errors import RunFailed

    def fails(exc):
        def run(*a, **k):
            raise exc
        return run

    base = ["embed", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "-o", "model.weights=random"]
    monkeypatch.setattr(runner, "run", fails(ValueError("a bug deep in a worker")))
    assert main(base) == 1 and "error: the run failed: ValueError: a bug deep in a worker" in capsys.readouterr().err
    monkeypatch.setattr(runner, "run", fails(RunFailed("2 shard(s) failed 3 times")))
    assert main(base) == 1
    monkeypatch.setattr(runner, "run", fails(OutputError("output is a file")))
    assert main(base) == 2 and "error: output is a file" in capsys.readouterr().err
