# Two commands do all set-up on a fresh machine:
#   make demo   - create a phantom, train a tiny model, restore it, write pictures (CPU is enough)
#   make test   - run the whole test suite
# Both create .venv on first use. TORCH picks the torch build: the default pin resolves to the
# CPU wheel where one is provided locally and to PyPI's CUDA build elsewhere (see README).
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# the suite waits on worker processes, servers and a browser, but every pytest worker also starts
# its own warm worker template: on 2 cores, 2 and 3 pytest workers ran in 332 s and 336 s, 4 in
# 355 s and 6 in 406 s (2026-11-28, same code, run alone)
TEST_WORKERS ?= 3

.PHONY: demo test bench venv clean bench-venv bench-real

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/uv pip install -q --python $(PY) -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# the benchmark anchors (CAREamics, BM3D): `.[bench]` with the installed torch kept. careamics caps
# torchvision at an older release whose wheel pins another torch; uv would replace the torch in
# .venv (for a CPU wheel: with a multi-GB CUDA build). The override file pins torch to the installed
# build and torchvision to its matching release (0.(minor+15): torch 2.13 → torchvision 0.28).
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -c "import torch; v = torch.__version__; mi = int(v.split('.')[1]); print(f'torch=={v}'); print(f'torchvision==0.{mi + 15}.*')" > $(VENV)/bench-overrides.txt
	$(VENV)/bin/uv pip install -q --python $(PY) --override $(VENV)/bench-overrides.txt -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench-venv: $(BENCH_STAMP)

demo: $(STAMP)
	$(VENV)/bin/emrestore demo --workdir demo-output

test: $(STAMP)
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --durations=15 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/quality.py
	$(PY) bench/speed.py
	$(PY) bench/pipeline.py

# the four EMDiffuse tasks on real EM beside CAREamics / BM3D (needs ../shared/data; ~2 h on 2 cores)
bench-real: $(BENCH_STAMP)
	$(PY) bench/denoise_real.py --save-model .bench-models/denoise
	$(PY) bench/superres_real.py
	$(PY) bench/isotropic_real.py
	$(PY) bench/finetune_real.py --base .bench-models/denoise

clean:
	rm -rf $(VENV) demo-output
