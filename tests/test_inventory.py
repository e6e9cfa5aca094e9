"""Inventories instead of listings: an S3 Inventory report (manifest.json + gzipped CSV without a header, keys
URL-encoded; or Parquet) and a hand-made Parquet/CSV list read as entry pages of the input root; and the
input listed by prefix in listing units on the real S3 server."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_batch.embed.inventory import inventory_files, inventory_listing, rows_estimate
from resnet_batch.errors import InputError


def _rows(listing) -> dict:
    out = {}
    for page in listing.pages:
        for r in page.to_pylist():
            out[r["path"].decode()] = (r["size"], r["mtime_ns"], r["etag"])
    return out


def test_s3_inventory_csv_report(tmp_path):
    data = tmp_path / "inv" / "data"
    data.mkdir(parents=True)
    lines = [
        '"photos","lib/a%20b/IMG_1.jpg","1200","2026-01-02T03:04:05.000Z","""e1""","true","false"',
        '"photos","lib/c/IMG_2.jpg","1300","2026-01-02T03:04:06.000Z","e2","true","false"',
        '"photos","lib/c/old.jpg","9","2026-01-02T03:04:06.000Z","e9","false","false"',  # an older version
        '"photos","lib/c/gone.jpg","","2026-01-02T03:04:06.000Z","","true","true"',  # a delete marker
        '"photos","lib/c/","0","2026-01-02T03:04:06.000Z","e0","true","false"',  # a folder marker
        '"photos","other/x.jpg","5","2026-01-02T03:04:06.000Z","e5","true","false"',  # not under the input
        '"elsewhere","lib/y.jpg","5","2026-01-02T03:04:06.000Z","e6","true","false"',  # another bucket
    ]
    (data / "part-0.csv.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    manifest = {"sourceBucket": "photos", "destinationBucket": f"arn:aws:s3:::{tmp_path.name}",
                "fileFormat": "CSV", "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag, IsLatest, "
                                                   "IsDeleteMarker",
                "files": [{"key": "inv/data/part-0.csv.gz", "size": 1, "MD5checksum": "x"}]}
    (tmp_path / "inv" / "manifest.json").write_text(json.dumps(manifest))
    from resnet_batch.embed.inventory import InventoryFile, _from_manifest

    files = _from_manifest(manifest, "s3", {}, "photos", "lib/", "manifest.json")
    assert [(x.uri, x.fmt, x.encoded_keys) for x in files] == [(f"s3://{tmp_path.name}/inv/data/part-0.csv.gz", "csv", True)]

    f = InventoryFile(str(data / "part-0.csv.gz"), {}, "csv", "photos", "lib/",
                      ("bucket", "key", "size", "last_modified", "etag", "is_latest", "is_delete_marker"),
                      encoded_keys=True)
    rows = {r["path"].decode(): r for page in f() for r in page.to_pylist()}
    assert sorted(rows) == ["a b/IMG_1.jpg", "c/IMG_2.jpg"]
    assert rows["a b/IMG_1.jpg"]["size"] == 1200 and rows["a b/IMG_1.jpg"]["etag"] == b"e1"
    assert rows["c/IMG_2.jpg"]["mtime_ns"] == 1767323046 * 10**9
    with pytest.raises(InputError, match="lists bucket 'photos', not the input's bucket 'other'"):
        _from_manifest(manifest, "s3", {}, "other", "", "manifest.json")


def test_parquet_list_for_a_local_folder_and_its_errors(tmp_path):
    root = tmp_path / "lib"
    t = pa.table({"Key": [f"{root}/a/{i}.jpg" for i in range(5)] + ["/elsewhere/z.jpg"],
                  "Size": pa.array([10, 11, 12, 13, 14, 15], pa.int64()),
                  "last_modified": pa.array([1, 2, 3, 4, 5, 6], pa.timestamp("s")),
                  "ETag": ["x"] * 6})
    inv = tmp_path / "inv"
    inv.mkdir()
    pq.write_table(t.slice(0, 3), inv / "p0.parquet")
    pq.write_table(t.slice(3), inv / "p1.parquet")
    rows = _rows(inventory_listing(str(inv), {}, str(root)))
    assert rows == {f"a/{i}.jpg": (10 + i, (1 + i) * 10**9, b"x") for i in range(5)}
    assert rows_estimate(inventory_files(str(inv), {}, str(root))) == 6
    with pytest.raises(InputError, match="inventory not found"):
        inventory_files(str(tmp_path / "missing.parquet"), {}, str(root))
    # a hand-made CSV list with a header: keys and ETags that look like numbers stay text
    (tmp_path / "list.csv").write_text(f"key,size,etag\n{root}/00123.jpg,5,0012\n{root}/b.jpg,6,\n")
    assert _rows(inventory_listing(str(tmp_path / "list.csv"), {}, str(root))) == {
        "00123.jpg": (5, None, b"0012"), "b.jpg": (6, None, None)}
    pq.write_table(pa.table({"name": ["a"]}), inv / "p2.parquet")
    with pytest.raises(InputError, match=r"p2.parquet: no key, size column \(it has \[.name.\]\)"):
        _rows(inventory_listing(str(inv), {}, str(root)))


@pytest.mark.s3
def test_s3_inventory_manifest_and_prefix_listing_units(s3_server):
    from resnet_batch.embed.listing import listing_tasks

    s3_server.make_bucket("inv-photos")
    fs = s3_server.filesystem()
    keys = [f"lib/{a}/{b}/IMG_{i}.jpg" for a in ("2024", "2025") for b in ("x", "y", "z") for i in range(7)]
    keys += ["lib/top.jpg"]
    for k in keys:
        fs.pipe_file(f"inv-photos/{k}", b"jpeg" + k.encode())
    opts = s3_server.storage_options()
    # listing units: every key once, whatever the number of listers
    for tasks in (1, 2, 4):
        listers = listing_tasks("s3://inv-photos/lib", opts, tasks)
        assert 1 <= len(listers) <= tasks
        got = [p.decode() for lister in listers for page in lister() for p in page.column("path").to_pylist()]
        assert sorted(got) == sorted(k[len("lib/"):] for k in keys)
    # an S3 Inventory report (Parquet) in the same store
    etags = {k: fs.info(f"inv-photos/{k}")["ETag"] for k in keys}
    table = pa.table({"bucket": ["inv-photos"] * len(keys), "key": keys, "size": [len(b"jpeg" + k.encode()) for k in keys],
                      "last_modified_date": pa.array([0] * len(keys), pa.timestamp("ms")),
                      "e_tag": [etags[k].strip('"') for k in keys]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    fs.pipe_file("inv-photos/reports/data/0.parquet", sink.getvalue().to_pybytes())
    fs.pipe_file("inv-photos/reports/manifest.json", json.dumps({
        "sourceBucket": "inv-photos", "destinationBucket": "arn:aws:s3:::inv-photos", "fileFormat": "Parquet",
        "fileSchema": "message s3.inventory { }", "files": [{"key": "reports/data/0.parquet"}]}).encode())
    rows = _rows(inventory_listing("s3://inv-photos/reports/manifest.json", opts, "s3://inv-photos/lib"))
    assert sorted(rows) == sorted(k[len("lib/"):] for k in keys)
    assert rows["top.jpg"][2] == etags["lib/top.jpg"].strip('"').encode()
