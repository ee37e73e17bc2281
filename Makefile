# The two commands of the README. Both create ./.venv from requirements*.txt on first use.
#   make demo    run the whole distributed demo (python run_demo.py)
#   make test    run the test suite (on RabbitMQ + Redis, else the embedded stack; see README)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test complete-demo benchmark clean

$(STAMP): requirements.txt requirements-dev.txt requirements-bench.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python run_demo.py $(ARGS)

complete-demo: $(STAMP)
	$(BIN)/python complete_demo.py

# The suite in two phases. First every test but the `serial` ones, in JOBS processes
# (pytest-xdist; --dist loadscope runs a module's tests in one process, so that what they share,
# such as the hosts cluster or the in-process workers, is made once; the longest units go
# first, see SLOWEST_FIRST and SHARE_NOTHING in tests/conftest.py). Each test has its own vhost,
# key prefix, database and folder, so modules run side by side. JOBS=6 although a CI machine may
# have two cores: the tests mostly wait (for workers, deadlines, frozen services); on two cores
# 4, 6 and 8 processes took 345, 237 and 217 s (the hosts module alone takes about 170 s).
# Then the `serial` tests: one after another, those that change RabbitMQ for the whole machine
# (an alarm, stop_app), which would block or cut off every other test; beside them the `cluster`
# ones (tests/test_cluster.py), which need the machine's cores but run RabbitMQ nodes of their
# own. Their output comes after the others', from a log, so that the two do not interleave.
# Exit code 5 ("no tests collected": ARGS chose none of a run's tests) is not a failure; any
# other failure of any run is. Exit code 2 of the first phase (Ctrl-C) ends it all there.
JOBS ?= 6
test: $(STAMP)
	@status=0; \
	$(BIN)/python -m pytest $(ARGS) -n $(JOBS) --dist loadscope --no-loadscope-reorder -m "not serial" || { code=$$?; [ $$code -ne 2 ] || exit 2; [ $$code -eq 5 ] || status=1; }; \
	log=$$(mktemp -t celery-demo-cluster-tests.XXXXXX); \
	$(BIN)/python -m pytest $(ARGS) -n 0 -m "serial and cluster" >$$log 2>&1 & cluster=$$!; \
	$(BIN)/python -m pytest $(ARGS) -n 0 -m "serial and not cluster" || [ $$? -eq 5 ] || status=1; \
	wait $$cluster || [ $$? -eq 5 ] || status=1; \
	echo "--- the serial tests marked cluster, which ran beside those above ---"; \
	cat $$log; rm -f $$log; \
	exit $$status

benchmark: $(STAMP)
	$(BIN)/python benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) .run .pytest_cache
