# carvision: two commands on a fresh machine: `make demo` and `make test`.
ENV := scripts/env.sh
PYTEST_ARGS ?=
TESTS ?= tests

.PHONY: env demo test lock clean
env:
	$(ENV) ensure

demo: env
	$(ENV) run 'python -m pipeline.cli demo --fresh'

test: env
	$(ENV) run 'python -m pytest -p no:cacheprovider $(PYTEST_ARGS) $(TESTS)'

lock: env
	$(ENV) lock

clean:
	rm -rf runs
