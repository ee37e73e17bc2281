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

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

benchmark: $(STAMP)
	$(BIN)/python benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) .run .pytest_cache
