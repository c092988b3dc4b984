# carvision: two commands on a fresh machine: `make demo` and `make test`.
ENV := scripts/env.sh
PYTEST_ARGS ?=

.PHONY: env demo test lock clean
env:
	$(ENV) ensure

demo: env
	$(ENV) run 'python -m pipeline.cli demo --fresh'

test: env
	$(ENV) run 'python -m pytest -p no:cacheprovider tests $(PYTEST_ARGS)'

lock: env
	$(ENV) lock

clean:
	rm -rf runs
