PYTHON ?= python3
KD = $(PYTHON) -m kd_cli

.PHONY: install test test-all demo clean

install:  ## install kd, its dependencies and Fashion-MNIST (Debian package, where apt is available)
	PYTHON=$(PYTHON) bash scripts/install.sh

test:  ## the default test suite (CI runs this); slow tests excluded
	$(PYTHON) -m pytest

test-all:  ## every test, slow ones included
	$(PYTHON) -m pytest -m ""

demo:  ## teacher -> scratch student -> KD student on Fashion-MNIST, offline, a few minutes on 2 CPU cores
	$(KD) train experiment=demo
	$(KD) distill experiment=demo

clean:
	rm -rf outputs .pytest_cache
