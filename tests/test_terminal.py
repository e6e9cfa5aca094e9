"""What a person sees: the real `resnet-batch` commands in a pseudo-terminal, and with pipes as in a log.

In a terminal, `embed` shows one live progress bar that ends with every image done, then the summary
with the counts and the next command; without one it prints a plain progress line every
--progress-every seconds. Either way no line of Ray's own logging (its INFO/WARNING records, the C++
core worker's lines, worker output forwarded to the driver) reaches the console: those stay in Ray's
log folder unless --verbose. `index`, `similar` and `status` never start Ray at all.
"""
from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest

from resnet_batch.dev.sample_data import make_sample_photos

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_ray]

REPO = Path(__file__).resolve().parent.parent
PHOTOS = 8
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
RAY_NOISE = [
    re.compile(r"\b(DEBUG|INFO|WARNING|WARN)\b"),  # Ray's Python records: "2026-.. INFO worker.py:2038 -- ..."
    re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d"),  # any timestamped log record
    re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"),  # the C++ core worker / raylet: "[2026-.. I 12 12] x.cc:1"
    re.compile(r"core_worker|\(raylet\)|\((pid|Map\w*|EmbedActor\w*)[=,]"),  # forwarded worker output
    re.compile(r"Started a local Ray instance|Connecting to existing Ray|Token authentication|ray\.init"),
]


def _noise(lines: list[str]) -> list[str]:
    return [line for line in lines if any(p.search(line) for p in RAY_NOISE)]


def _lines(raw: bytes) -> list[str]:
    """What the terminal shows, line by line: escape sequences gone, every redraw (\\r) its own line."""
    text = ANSI.sub("", raw.decode("utf-8", "replace"))
    return [line.rstrip() for line in re.split(r"[\r\n]+", text) if line.strip()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The user's environment without Ray or rich settings, a terminal type, and a Ray temp dir of its
    own (short: Ray's socket paths must stay under 108 bytes) so no other Ray on this machine is joined."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb-tty-", dir="/tmp"))
    drop = ("RAY_", "NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TTY_", "PYTHONUNBUFFERED")
    e = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    e.update(PYTHONPATH=str(REPO), TERM="xterm-256color", RAY_TMPDIR=str(ray_tmp))
    yield e
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def few_photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tty-photos")
    make_sample_photos(root, PHOTOS, per_folder=4, seed=3)
    return root


def _embed_cmd(photos: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "resnet_batch.cli", "embed", "--config", str(REPO / "configs/local.yaml"),
            "--input", str(photos), "--output", str(out), "-o", "model.weights=random",
            "-o", "input.images_per_shard=4", "-o", "compute.batch_size=4", "-o", "compute.decode_batch_size=4",
            *flags]


def in_terminal(cmd: list[str], env: dict, timeout: float = 300, columns: int = 120) -> tuple[int, bytes]:
    """Run cmd with a pseudo-terminal as its stdin, stdout and stderr; (exit status, every byte it wrote)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                            start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            running = proc.poll() is None
            if running and time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[3]} still running after {timeout}s:\n{bytes(out[-3000:]).decode()}")
            ready, _, _ = select.select([master], [], [], 0.5 if running else 0)
            if not ready:
                if running:
                    continue
                break  # exited, and everything it wrote has been read
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: no process holds the terminal any more
                break
            if not data:
                break
            out += data
        return proc.wait(timeout=30), bytes(out)
    finally:
        os.close(master)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of this command's session still alive
        except ProcessLookupError:
            pass


def test_embed_in_a_terminal_shows_one_bar_then_the_summary(env, few_photos, tmp_path):
    out = tmp_path / "out"
    code, raw = in_terminal(_embed_cmd(few_photos, out), env)
    lines = _lines(raw)
    shown = "\n".join(lines)
    assert code == 0, shown[-4000:]

    frames = [line for line in lines if line.startswith("embedding")]
    assert frames, shown[-4000:]  # rich drew the bar
    assert re.search(rf"\b{PHOTOS}/{PHOTOS}\b", frames[-1]) and "0 failed" in frames[-1], frames[-1]
    assert all(re.search(rf"\b\d+/({PHOTOS}|\?)", f) for f in frames), frames  # N of the planned images
    summary_at = raw.index(b"resnet-batch: complete")
    assert raw.rindex(b"\x1b[?25l", 0, summary_at) < raw.rindex(b"\x1b[?25h", 0, summary_at)  # bar stopped first
    last = max(i for i, line in enumerate(lines) if line.startswith("embedding"))
    after_bar = lines[last + 1:]  # the bar ended on its own line; the summary follows it
    assert after_bar[0] == f"resnet-batch: complete -> {out}", after_bar
    assert f"  images: {PHOTOS} ok, 0 failed, 0 skipped (of {PHOTOS} inputs)" in after_bar
    assert f"  next: resnet-batch index --embeddings {out} --out {out}-index  (builds the index there; the same " \
        "command after a later run updates it)" in after_bar
    assert _noise(lines) == [], _noise(lines)

    # The commands that follow read the output and the index only: no Ray starts, nothing of Ray is printed.
    sessions = set((Path(env["RAY_TMPDIR"]) / "ray").glob("session_2*"))
    index = tmp_path / "index"
    first = sorted(p.relative_to(few_photos).as_posix() for p in few_photos.rglob("*.jpg"))[0]
    for cmd, expect in ((["index", "--embeddings", str(out), "--out", str(index)], f"indexed {PHOTOS} images"),
                        (["similar", "--index", str(index), "--id", first, "-k", "3"], "rank"),
                        (["status", str(out)], f"images: {PHOTOS} ok, 0 failed")):
        code, raw = in_terminal([sys.executable, "-m", "resnet_batch.cli", *cmd], env)
        lines = _lines(raw)
        assert code == 0 and any(expect in line for line in lines), (cmd[0], lines)
        assert _noise(lines) == [], (cmd[0], _noise(lines))
    assert set((Path(env["RAY_TMPDIR"]) / "ray").glob("session_2*")) == sessions


def test_embed_without_a_terminal_prints_plain_progress_lines(env, few_photos, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(_embed_cmd(few_photos, out, "--progress-every", "1"), env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == 0, "\n".join(lines)[-4000:]
    assert "\x1b" not in res.stdout + res.stderr  # no escape sequences in a log

    progress = [line for line in res.stderr.splitlines() if line.startswith("[resnet-batch] ")]
    pattern = re.compile(rf"^\[resnet-batch\] \d+/{PHOTOS} images, \d+ failed, (- |[\d.,]+ )img/s(, ETA \S+)?, "
                         r"\d+ actor\(s\), (starting model actors|reading|model-bound|waiting for input)$")
    assert len(progress) >= 2, lines  # the periodic lines (Ray and the actors take seconds) and the last
    assert all(pattern.match(line) for line in progress), progress
    assert progress[-1].startswith(f"[resnet-batch] {PHOTOS}/{PHOTOS} images, 0 failed"), progress
    summary = res.stdout.splitlines()
    assert summary[0] == f"resnet-batch: complete -> {out}", summary
    assert f"  images: {PHOTOS} ok, 0 failed, 0 skipped (of {PHOTOS} inputs)" in summary
    assert f"  next: resnet-batch index --embeddings {out} --out {out}-index  (builds the index there; the same " \
        "command after a later run updates it)" in summary
    assert _noise(lines) == [], _noise(lines)
