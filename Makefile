# Two commands do everything on a fresh machine with only Python 3.11: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The agent's tflite-runtime fallback needs numpy < 2: it gets its own small environment, used by one test.
TFLITE_VENV := .venv-tflite

.PHONY: test demo demo-convert bench bench-delta bench-agent bench-api bench-rollout bench-ingest bench-scaleout lint clean \
	system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the dependency list changes. torch==2.13.0 resolves to the CPU wheel (see shared/FACTS.md).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[convert,agent,server,dev]'
	$(BIN)/python -m pip install --quiet --no-deps onnx2tf==1.28.8 tf-keras==2.21.0 onnx2torch==1.5.15
	touch $@

$(TFLITE_VENV)/.installed:
	$(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/python -m pip install --quiet "tflite-runtime==2.14.0" "numpy<2"
	touch $@

# Services the tests start on loopback (Mosquitto, a throwaway PostgreSQL cluster), the browser the console tests
# drive (Debian's Chromium: Playwright's own browser download is not reachable), and the font the real-model zoo
# renders its text lines with. Installed once; nothing is left running.
system-deps:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] || \
		! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ ! -x /usr/bin/chromium ] || \
		[ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto postgresql \
			chromium chromium-driver fonts-dejavu-core >/dev/null; \
	fi

# Two pytest processes side by side: the converters' CPU-bound tests and the rest (scripts/run_tests.py).
test: $(STAMP) $(TFLITE_VENV)/.installed system-deps
	$(BIN)/python scripts/run_tests.py

demo: $(STAMP) system-deps
	$(BIN)/python scripts/demo.py

demo-convert: $(STAMP)
	$(BIN)/python scripts/convert_demo.py

bench: $(STAMP)
	$(BIN)/python bench/convert_bench.py

bench-delta: $(STAMP)
	$(BIN)/python bench/delta_bench.py

bench-agent: $(STAMP) system-deps
	$(BIN)/python bench/agent_bench.py

bench-api: $(STAMP) system-deps
	$(BIN)/python bench/api_bench.py

bench-rollout: $(STAMP) system-deps
	$(BIN)/python bench/rollout_bench.py

bench-ingest: $(STAMP) system-deps
	$(BIN)/python bench/ingest_bench.py

bench-scaleout: $(STAMP) system-deps
	$(BIN)/python bench/scaleout_bench.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(TFLITE_VENV) demo-out bench/results .pytest_cache
