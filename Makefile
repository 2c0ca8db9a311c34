# Two commands on a fresh machine: `make demo` (set up, pull and export the default fleet, answer a
# question with a real model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
QUESTION ?= What is the capital of France?
FLEET := smollm2-135m gemma3-270m qwen2.5-coder-0.5b qwen2.5-coder-1.5b minilm-l6

.PHONY: demo test setup clean-venv

$(BIN)/calm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[export,test]'
	touch $@

setup: $(BIN)/calm

demo: setup
	$(BIN)/calm models pull $(FLEET)
	$(BIN)/calm models export $(FLEET)
	$(BIN)/calm models list
	$(BIN)/calm route --model smollm2-135m "$(QUESTION)"

# pytest exits 5 when it collected no tests: that is a failure, not a pass.
test: setup
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$status

clean-venv:
	rm -rf $(VENV)
