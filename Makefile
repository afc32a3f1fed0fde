# prunet: `make demo` and `make test` each set everything up from nothing, then run.
# The second time, setup takes a second: the venv and the data are kept.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prunet-installed
# Exactly this version: on these machines pip takes it from a CPU build on local disk,
# where any other spec (unpinned, a range) would download a multi-GB CUDA build.
TORCH  := torch==2.13.0
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup native data demo test test-all bench bench-quick results clean

setup: $(STAMP) data native

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned, so the package's `torch>=2.1` finds it installed and pulls nothing.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

# prunet's sparse kernel (prunet/sparse/csrc/spmm.c), with OpenMP where the compiler has it. Without a
# compiler, or if it fails, make goes on: sparse layers then run on torch's CSR product, and
# `python -c "import prunet.sparse.native as n; print(n.status())"` says why. The same flags as
# prunet.sparse.native.FLAGS (its compile_library() builds it from Python); -march=native: for this machine.
ifeq ($(origin CC),default)
CC := gcc
endif
NATIVE      := prunet/sparse/csrc/spmm.so
NATIVE_SRC  := prunet/sparse/csrc/spmm.c
NATIVE_FLAGS := -O3 -march=native -fPIC -shared

# Beside it, prunet/sparse/csrc/fastcall.c as a Python extension module, compiled with the headers of the
# Python that runs prunet (the venv's, else $(PYTHON): the venv is made from it): it calls the kernel without
# ctypes, tens of microseconds sooner a call with the caches cold. Without the headers make goes on and
# ctypes calls the kernel. The same flags as prunet.sparse.native.FASTCALL_FLAGS.
PYEXT_PYTHON   := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
FASTCALL       := prunet/sparse/csrc/_fastcall$(shell $(PYEXT_PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX') or '.so')" 2>/dev/null || echo .so)
FASTCALL_SRC   := prunet/sparse/csrc/fastcall.c
FASTCALL_FLAGS := -O2 -fPIC -shared

native: $(NATIVE) $(FASTCALL)

$(NATIVE): $(NATIVE_SRC)
	@if ! command -v $(CC) >/dev/null 2>&1; then \
		echo "note: no C compiler ($(CC)); prunet's sparse layers will use torch CSR (install gcc, then make native)"; \
	elif $(CC) $(NATIVE_FLAGS) -fopenmp $< -o $@.tmp 2>/dev/null || $(CC) $(NATIVE_FLAGS) $< -o $@.tmp; then \
		mv $@.tmp $@; (grep -m1 -E '^(flags|Features)' /proc/cpuinfo > $@.cpu || rm -f $@.cpu) 2>/dev/null; \
		echo "built $@"; \
	else \
		rm -f $@.tmp; echo "note: $(CC) could not build $@; prunet's sparse layers will use torch CSR"; \
	fi

$(FASTCALL): $(FASTCALL_SRC)
	@inc=$$($(PYEXT_PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null); \
	if ! command -v $(CC) >/dev/null 2>&1; then \
		true; \
	elif [ ! -f "$$inc/Python.h" ]; then \
		echo "note: no Python headers (python3-dev) for $(FASTCALL_SRC); prunet calls its kernel through ctypes"; \
	elif $(CC) $(FASTCALL_FLAGS) -I"$$inc" $< -o $@.tmp; then \
		mv $@.tmp $@; echo "built $@"; \
	else \
		rm -f $@.tmp; echo "note: $(CC) could not build $@; prunet calls its kernel through ctypes"; \
	fi

# Fashion-MNIST from Debian's dataset-fashion-mnist, unless the data is already there
# (the Debian folder, or a folder named by PRUNET_DATA).
data:
	@if [ -n "$$PRUNET_DATA" ] || [ -e $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
		true; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "note: Fashion-MNIST not found; as root: apt-get install dataset-fashion-mnist, or set PRUNET_DATA"; \
	fi

demo: setup
	$(BIN)/prunet run recipes/lenet300_fashion.yaml --overwrite

# Tests marked slow (over ~3 s each on 2 cores) are left out of `make test`; `make test-all` runs every test.
test: setup
	$(BIN)/python -m pytest -m "not slow"

test-all: setup
	$(BIN)/python -m pytest

# The full side-by-side (bench_reproduce) takes about an hour on 2 cores, bench_frontier (25x-200x, both
# LeNets) about two more; bench-quick a few minutes.
bench: setup
	$(BIN)/python benchmarks/bench_masks.py
	$(BIN)/python benchmarks/bench_sparse.py
	$(BIN)/python benchmarks/bench_prune_scale.py
	$(BIN)/python benchmarks/bench_compress.py
	$(BIN)/python benchmarks/bench_ddp.py
	$(BIN)/python benchmarks/bench_reproduce.py
	$(BIN)/python benchmarks/bench_frontier.py --models lenet_300_100 lenet_5
	$(BIN)/python benchmarks/bench_lm.py
	$(BIN)/python benchmarks/bench_oneshot.py
	$(BIN)/python benchmarks/make_results.py

bench-quick: setup
	$(BIN)/python benchmarks/bench_prune_scale.py
	$(BIN)/python benchmarks/bench_reproduce.py --quick
	$(BIN)/python benchmarks/bench_frontier.py --quick
	$(BIN)/python benchmarks/bench_lm.py --quick
	$(BIN)/python benchmarks/make_results.py

# RESULTS.md from the JSON the benchmarks wrote (benchmarks/results/).
results: setup
	$(BIN)/python benchmarks/make_results.py

clean:
	rm -rf $(VENV) runs .pytest_cache $(NATIVE) $(NATIVE).cpu prunet/sparse/csrc/_fastcall*.so*
