# segcal: the two commands are `make demo` and `make test`; both create .venv when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Real data and weights: CAMVID_ROOT / SEGCAL_ESPNET_WEIGHTS, else ../shared when it exists,
# else unset: `segcal demo` then downloads them (sha256-checked) into ~/.cache/segcal.
CAMVID_ROOT ?= $(wildcard $(abspath ../shared/data/camvid))
SEGCAL_ESPNET_WEIGHTS ?= $(wildcard $(abspath ../shared/models/espnet/espnet_p_2_q_8_camvid.pth))
ifneq ($(CAMVID_ROOT),)
export CAMVID_ROOT
endif
ifneq ($(SEGCAL_ESPNET_WEIGHTS),)
export SEGCAL_ESPNET_WEIGHTS
endif
export RAY_USAGE_STATS_ENABLED := 0
# `make demo` / `make test` start Ray on this machine only: keep it on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# More `segcal demo` options: make demo DEMO_ARGS="--quick" (or "--output DIR", "--force").
DEMO_ARGS ?=

demo: $(STAMP)
	$(VENV)/bin/segcal demo $(if $(CAMVID_ROOT),--data '$(CAMVID_ROOT)') \
		$(if $(SEGCAL_ESPNET_WEIGHTS),--weights '$(SEGCAL_ESPNET_WEIGHTS)') $(DEMO_ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check pipeline jobs tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/metrics.py
	$(PY) benchmarks/fit.py
	$(PY) benchmarks/evaluate.py
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/shards.py

clean:
	rm -rf $(VENV) .pytest_cache runs
