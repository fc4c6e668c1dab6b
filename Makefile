# edgeshard_mpi — the two commands a newcomer needs: `make demo` and `make test`.
# Every target installs what it needs into .venv first (offline-friendly: torch is pinned
# to a CPU build; override TORCH for your platform, e.g. TORCH="torch" on a Jetson image).

PYTHON  ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
EXTRAS  ?= mpich,dev,plot
NP      ?= 4
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The pip MPICH's launcher when installed, else a system mpiexec (see README).
MPIEXEC  = $(if $(wildcard $(BIN)/mpiexec),$(BIN)/mpiexec,mpiexec)
# Public test data beside the checkout, as CI has it; point it elsewhere if yours lives there.
export EDGESHARD_DATA ?= $(abspath $(CURDIR)/../shared/data)
# The demo serves the trained stories260K model when the data folder has it, else a preset.
JOB     ?= $(if $(wildcard $(EDGESHARD_DATA)/stories260K-hf/config.json),jobs/demo.toml,jobs/demo-synthetic.toml)

.PHONY: install demo test lint bench-overhead bench-stagecost bench-speed bench-planner bench-pipeline bench-steady bench-slowlinks bench bench-quick report clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: install
	MPIEXEC_TIMEOUT=600 $(MPIEXEC) -n $(NP) $(BIN)/python -m mpi4py -m edgeshard_mpi run $(JOB)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench-overhead: install
	$(BIN)/python -m edgeshard_mpi.bench.overhead --model tiny --out results/bench-overhead-tiny
	$(BIN)/python -m edgeshard_mpi.bench.overhead --model small --out results/bench-overhead-small

# What an extra rank costs per token and where (per-phase wall/CPU per rank), the waiting
# ranks' doorbells off vs on, 1/2/4 ranks, bench-speed's models (about 5 min).
bench-stagecost: install
	$(BIN)/python -m edgeshard_mpi.bench.stagecost --out results/bench-stagecost

# Decode speed against llama.cpp (built from the llama-cpp-python sdist into
# ~/.cache/edgeshard-llamacpp; needs cmake, a C++ compiler and PyPI once) and the memory floor.
bench-speed: install
	$(BIN)/python -m edgeshard_mpi.bench.speed --out results/bench-speed

bench-planner: install
	$(BIN)/python -m edgeshard_mpi.bench.planner --out results/bench-planner

bench-pipeline: install
	$(BIN)/python -m edgeshard_mpi.bench.pipeline --out results/bench-pipeline

# Are the emulated devices steady? 10 profiles of the small testbed (root: OS emulation).
bench-steady: install
	$(BIN)/python -m edgeshard_mpi.bench.steady --out results/bench-steady

# Slow links side by side (wires, CE-CoLLM, baselines) on the small testbed at 1-8 Mb/s
# source-cloud (root: tc; else emulated inside the jobs), priced by eval. ~10-15 min.
bench-slowlinks: install
	$(BIN)/python -m edgeshard_mpi.bench.slowlinks --out results/bench-slowlinks

# The paper's experiments on the 15-device emulated testbed (root: namespaces + tc +
# cgroups; else emulated inside the jobs): 82 runs, about 50 min on a quiet 2-core host
# (the runs of one model and testbed variant share an MPI launch). Resumable: finished runs
# are skipped. A reduced run, e.g.:
#   make bench BENCH_ARGS="--models mini-13b,mini-70b --bandwidths 0.081,4.03" BENCH_OUT=results/bench-big
BENCH_ARGS ?=
BENCH_OUT  ?= results/bench
bench: install
	$(BIN)/python -m edgeshard_mpi.bench.paper --out $(BENCH_OUT) $(BENCH_ARGS)
	$(BIN)/python -m edgeshard_mpi report $(BENCH_OUT) --out $(BENCH_OUT)/report

bench-quick: install
	$(BIN)/python -m edgeshard_mpi.bench.paper --quick --out results/bench-quick
	$(BIN)/python -m edgeshard_mpi report results/bench-quick --out results/bench-quick/report

clean:
	rm -rf results .pytest_cache .ruff_cache
