# segcal: the two commands are `make demo` and `make test`; both create .venv when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Real data and weights: CAMVID_ROOT / SEGCAL_ESPNET_WEIGHTS, else ../shared when it exists.
CAMVID_ROOT ?= $(abspath ../shared/data/camvid)
SEGCAL_ESPNET_WEIGHTS ?= $(abspath ../shared/models/espnet/espnet_p_2_q_8_camvid.pth)
export CAMVID_ROOT SEGCAL_ESPNET_WEIGHTS
export RAY_USAGE_STATS_ENABLED := 0
# `make demo` / `make test` start Ray on this machine only: keep it on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/segcal run configs/camvid_espnet.yaml

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check pipeline jobs tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/metrics.py
	$(PY) benchmarks/fit.py
	$(PY) benchmarks/evaluate.py
	$(PY) benchmarks/extract.py

clean:
	rm -rf $(VENV) .pytest_cache runs
