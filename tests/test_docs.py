"""Every shell command in the README and the docs pages runs as written: the ```bash blocks of README.md
and docs/*.md, in order, in a scratch folder that looks like the repository after `make demo` made its
photos (.venv, configs and jobs linked; 24 sample photos in data/sample). Blocks shown as ```text are
for other machines (S3, a cluster) and are covered by their own tests."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.jobs import REPO
from tests.helpers.s3server import free_ports

pytestmark = [pytest.mark.ray, pytest.mark.slow]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_blocks(path: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_every_page_has_only_bash_or_text_blocks():
    """A block that is neither is neither run nor knowingly skipped."""
    for path in DOCS:
        fences = re.findall(r"^```(\S*)$", path.read_text(), flags=re.M)
        opening = fences[0::2]
        assert set(opening) <= {"bash", "text"}, (path.name, opening)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("docs")
    for name in (".venv", "configs", "jobs"):
        (work / name).symlink_to(REPO / name)
    res = subprocess.run([str(REPO / ".venv/bin/resnet-batch"), "sample-data", "--out", "data/sample", "-n", "24",
                          "--per-folder", "12"], cwd=work, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return work


@pytest.mark.parametrize("page", [p.relative_to(REPO).as_posix() for p in DOCS if shell_blocks(p)])
def test_shell_blocks_run(page, workdir, ray_address):
    port = str(free_ports(1)[0])
    for block in shell_blocks(REPO / page):
        script = block.replace("8000", port)  # the service's example port, free here
        try:
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, capture_output=True,
                                 text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), **ray_address})
        except subprocess.TimeoutExpired as late:
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (late.stdout, late.stderr))
            pytest.fail(f"{page}: still running after 600 s:\n{block}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}")
        assert res.returncode == 0, f"{page}:\n{block}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}"
