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
# such as the hosts cluster or the in-process workers, is made once; the longest modules go
# first, see SLOWEST_FIRST in tests/conftest.py). Each test has its own vhost, key prefix,
# database and folder, so modules run side by side. Then, alone, the tests that change RabbitMQ
# for the whole machine (an alarm, stop_app), which would block or cut off every other test, and
# the three-node cluster, which needs the whole machine (tests/test_cluster.py).
# Exit code 5 ("no tests collected": ARGS chose none of a phase's tests) is not a failure; any
# other failure of either phase is.
JOBS ?= 4
test: $(STAMP)
	@status=0; \
	$(BIN)/python -m pytest $(ARGS) -n $(JOBS) --dist loadscope --no-loadscope-reorder -m "not serial" || [ $$? -eq 5 ] || status=1; \
	$(BIN)/python -m pytest $(ARGS) -n 0 -m serial || [ $$? -eq 5 ] || status=1; \
	exit $$status

benchmark: $(STAMP)
	$(BIN)/python benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) .run .pytest_cache
