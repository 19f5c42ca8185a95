# Quick start:  make demo        (set up, train a small model on the built-in data, benchmark)
#               make test        (set up, run the whole test suite; the first run builds mmcv)
#               make test-fast   (set up, run every test but the mm suite; no mmcv needed)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyPI's torchvision is built against PyPI's (CUDA) torch, which also runs on CPU-only machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup mm mm-notice data demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,triton,tensorboard]"
	touch $@

setup: $(VENV)/.installed

# mmdet / mmseg with mmcv built from source (cached by pip after the first build)
mm: setup
	tools/install_mm.sh $(PY)

# the built-in quick-start dataset (Debian package; needs root or sudo)
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: setup data
	$(PY) tools/demo.py

# said before anything else runs: the build is the long part of a first `make test`
mm-notice:
	@if ! $(PY) -c "import mmcv._ext, mmdet, mmseg" 2>/dev/null; then \
		echo "make test: the first run builds mmcv from source for the mm suite (tens of minutes; pip caches the build)."; \
		echo "           For a quick check of everything but the mm suite: make test-fast"; \
	fi

test: mm-notice setup mm data
	$(PY) -m pytest -q --durations=30

test-fast: setup data
	$(PY) -m pytest -q --ignore=tests/mm

bench: setup
	$(PY) tools/bench_kernels.py

clean:
	rm -rf $(VENV) .pytest_cache
