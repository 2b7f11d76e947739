# Two commands: `make test` and `make demo`. Both set everything up first; re-running is fast.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements/cpu.txt
PIP    := $(PY) -m pip install -q --disable-pip-version-check
# Where the CPU build of torch comes from (PyPI's Linux torch is the CUDA build, gigabytes of CUDA wheels).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# `pip check` lines that are expected (requirements/cpu.txt says why); anything else fails the set-up.
KNOWN_PIP_CHECK := ^torchrec 1\.8\.0 (requires fbgemm-gpu, which is not installed|has requirement torchmetrics==1\.0\.3, but you have torchmetrics 1\.9\.0)\.$$|^No broken requirements found\.$$

.PHONY: setup test demo bench gpu-check pip-check clean

# The lock is used as constraints: pip resolves the project's declared dependencies (pyproject.toml) and
# every version is held to the lock. Three steps (README "Installing"):
# 1. torch (and setuptools, the build backend of step 2) alone from the CPU index, --no-deps so that only
#    these two are looked up there (each unreachable index URL costs pip's retries);
# 2. the project with every extra (editable, built by the lock's setuptools), torch's dependencies included;
# 3. torchrec with --no-deps: it declares the CUDA fbgemm-gpu and torchmetrics==1.0.3, so it cannot be
#    resolved against the lock; what it really needs is declared by the project (core and the `cpu` extra).
$(STAMP): requirements/cpu.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -c $(LOCK) --no-deps --extra-index-url $(TORCH_INDEX) torch setuptools
	$(PIP) -c $(LOCK) --no-build-isolation -e '.[all]'
	$(PIP) -c $(LOCK) --no-deps torchrec
	@$(MAKE) --no-print-directory pip-check
	@touch $(STAMP)

pip-check:
	@$(PY) -m pip check | grep -vE '$(KNOWN_PIP_CHECK)' && { echo "pip check: unexpected problems above (expected ones: requirements/cpu.txt)"; exit 1; } || true

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/recsys demo

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
