PYTHON ?= python3
KD = $(PYTHON) -m kd_cli

.PHONY: install test test-all demo bench clean

install:  ## install kd, its dependencies and Fashion-MNIST (Debian package, where apt is available)
	PYTHON=$(PYTHON) bash scripts/install.sh

TEST_WORKERS ?= auto

test:  ## the default test suite (CI runs this), one worker per core; slow tests excluded. TEST_WORKERS=0 for one process
	$(PYTHON) -m pytest -n $(TEST_WORKERS)

test-all:  ## every test, slow ones included
	$(PYTHON) -m pytest -n $(TEST_WORKERS) -m ""

demo:  ## teacher -> scratch student -> KD student on Fashion-MNIST, offline, a few minutes on 2 CPU cores
	$(KD) train experiment=demo
	$(KD) distill experiment=demo

bench:  ## kd's engine vs a plain PyTorch loop, side by side (~10 min on 2 CPU cores); outputs/bench/bench.csv. BENCH_ARGS="--rounds 3 --cases 1"
	$(PYTHON) -m kd_cli.bench $(BENCH_ARGS)

clean:
	rm -rf outputs .pytest_cache
