# carvision: two commands on a fresh machine: `make demo` and `make test`.
ENV := scripts/env.sh
PYTEST_ARGS ?=
TESTS ?= tests
# Test files run on this many pytest-xdist workers, each file's tests in order on one worker
# (the end-to-end module shares its pipeline runs); 1 runs them in this process.
TEST_WORKERS ?= 2

.PHONY: env demo test test-fast lock clean image vertex-spec
IMAGE ?= carvision:local
env:
	$(ENV) ensure

demo: env
	$(ENV) run 'python -m carvision.pipeline.cli demo --fresh'

test: env
	tests/host/test_env_sh.sh
	tests/host/test_mediapipe.sh
	tests/host/test_client_install.sh
	$(ENV) run 'python -m pytest -p no:cacheprovider $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS) $(TESTS)'

# Everything but the end-to-end pipeline runs (a few minutes): while editing.
test-fast: env
	$(ENV) run 'python -m pytest -p no:cacheprovider -m "not e2e" $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS) $(TESTS)'

lock: env
	$(ENV) lock

# The pipeline/worker container (Dockerfile), where Docker and its registries are reachable.
image:
	@command -v docker >/dev/null || { echo 'docker is not installed here'; exit 2; }
	docker build -t $(IMAGE) .

# The Vertex AI pipeline spec from configs/dataflow.yaml (offline).
vertex-spec: env
	$(ENV) run 'python -m carvision.pipeline.cli run --runner vertex --config dataflow'

clean:
	rm -rf runs
