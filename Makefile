# The two entry points of the project. Each creates .venv when it is missing and installs the
# project into it; a second run finds the install stamp and starts in seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch. On a CUDA machine: make TORCH=torch (or install torch yourself first).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The web UI tests drive Debian's Chromium through Playwright (never `playwright install`).
CHROMIUM := /usr/bin/chromium
# The monitoring test runs Debian's Prometheus on the config Ray generates.
PROMETHEUS := /usr/bin/prometheus
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: demo test install clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ray_jobs.demo $(ARGS)

test: $(STAMP) $(CHROMIUM) $(PROMETHEUS)
	$(PY) -m pytest tests -q

# The GPU check (README: GPU check) needs the repository and PyTorch only, no install: it runs with
# the venv's python when there is one, else with $(PYTHON) and the machine's own torch.
GPU_CHECK_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-check:
	$(GPU_CHECK_PY) -m ray_jobs.gpu_check $(ARGS)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq chromium

# Without the package's recommends (node exporter, smartmontools): more daemons the test does not use.
$(PROMETHEUS):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends prometheus

clean:
	rm -rf $(VENV)
