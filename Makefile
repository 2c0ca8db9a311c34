# Two commands on a fresh machine: `make demo` (set up, pull and export the default fleet, answer a
# question with a real model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
QUESTION ?= What is the capital of France?
FLEET := smollm2-135m gemma3-270m qwen2.5-coder-0.5b qwen2.5-coder-1.5b minilm-l6

.PHONY: demo test test-fast setup bench-setup clean-venv

$(BIN)/calm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[export,test]'
	touch $@

setup: $(BIN)/calm

demo: setup
	$(BIN)/calm models pull $(FLEET)
	$(BIN)/calm models export $(FLEET)
	$(BIN)/calm models list
	$(BIN)/calm route --explain "$(QUESTION)"

# pytest exits 5 when it collected no tests: that is a failure, not a pass.
test: setup
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$status

# The tests that need neither the real fleet nor minutes.
test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not fleet and not slow" $(PYTEST_ARGS)

# llama.cpp (the engine benchmark's reference) and matplotlib (the workload benchmark's plot). The AMX
# kernels of llama-cpp-python 0.3.36's native build crashed in prompt evaluation here: build without them.
bench-setup: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON" \
	  $(BIN)/python -m pip install --quiet -e '.[bench,plot]'

clean-venv:
	rm -rf $(VENV)
