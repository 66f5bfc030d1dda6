# make test / make demo build .venv by themselves (once; again when requirements.txt or
# pyproject.toml change). GPU machines: install your CUDA torch into .venv first, or pick one
# with TORCH_SPEC; torch is only installed when the venv lacks it.

PYTHON       ?= python3
VENV         := .venv
PY           := $(VENV)/bin/python
# -qq: errors only (this machine's pip config warns about every index dir it skips).
PIP          := $(PY) -m pip --disable-pip-version-check -qq
STAMP        := $(VENV)/.installed
TORCH_SPEC   ?= torch==2.13.0
MOSHI_SPEC   ?= moshi==0.2.13
WHISPER_SPEC ?= openai-whisper==20250625
WHISPER_DEPS ?= tiktoken more-itertools numba
# The real hosted-API clients the compatibility tests drive (docs/compat.md). pipecat-ai pins an old
# soxr that lacks the resampler wire/formats.py uses, so it goes in last with --no-deps, after its
# real needs.
COMPAT_SPEC  ?= lameenc==1.9.0 "aiohttp>=3.9" livekit-agents==1.8.9 livekit-plugins-elevenlabs==1.8.9 \
                livekit-plugins-cartesia==1.8.9 elevenlabs==2.78.0 cartesia==4.2.0
PIPECAT_SPEC ?= pipecat-ai==1.14.0
PIPECAT_DEPS ?= aiofiles docstring_parser loguru loudness Markdown sentencex==1.0.32 Pillow protobuf pydantic \
                python-dotenv resampy openai wait_for2 pyyaml num2words onnxruntime "deepgram-sdk>=6.1.1,<8"

.PHONY: test test-fast demo venv clean gpu-wheels system-deps

# The suite in two runs. First every test but the `realtime` ones, on TEST_WORKERS processes
# (pytest-xdist), a whole file to a worker (a file's module fixtures start its server once): most
# tests wait on real-time audio or on servers starting, and with two workers on a 2-core machine
# that part took ~480 s and the rest ~55 s, against ~800 s for the whole suite in one process (a
# second helper's load tests on the box); four workers had compatibility clients refused as busy.
# Then the `realtime` tests (a bystander's underruns are asserted), with no other test beside them.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) system-deps
	$(PYTEST_PARALLEL) -m "not realtime"
	$(PY) -m pytest -q -m realtime

# The unit tests without the slow end-to-end ones (servers, parity runs): a quick check while working.
test-fast: $(STAMP)
	$(PYTEST_PARALLEL) -m "not slow"

# Programs some tests drive for real (scripts/system-packages.txt); those tests skip without them.
system-deps:
	@bash scripts/system_deps.sh

# Starts server.py on the tiny checkpoint (free port), waits for /health, runs test_client.py with
# an inject against it, prints TTFA / frames / real-time factor, writes demo.wav, stops the server.
demo: $(STAMP)
	$(PY) -m dia2stream.tools.demo -o demo.wav

venv: $(STAMP)

# moshi, openai-whisper and pipecat-ai go in last, with --no-deps: their pins would replace
# torch/numpy (and whisper's triton is not needed). pip checks no conflicts under --no-deps.
# Everything else is one pip run (one resolve, one install): four runs, one after the other, took
# ~20-35 s more of a fresh clone's `make test` on a 2-core machine, for the same packages.
$(STAMP): requirements.txt pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if [ -z "$(TORCH_SPEC)" ]; then \
	    echo "torch is missing from $(VENV) and TORCH_SPEC is empty: install torch into $(VENV) first" >&2; exit 1; \
	  fi; \
	  echo "installing $(TORCH_SPEC) into $(VENV)"; \
	  $(PIP) install "$(TORCH_SPEC)"; \
	fi
	@echo "installing requirements and the compatibility test clients into $(VENV)"
	@$(PIP) install -r requirements.txt $(WHISPER_DEPS) $(COMPAT_SPEC) $(PIPECAT_DEPS)
	@$(PIP) install --no-deps "$(MOSHI_SPEC)" "$(WHISPER_SPEC)" "$(PIPECAT_SPEC)"
	@touch $@

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info demo.wav
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Wheels for a CUDA machine with Python 3.12 and torch but no moshi/websockets/soundfile (the lent
# H100): scripts/gpu_bench.sh installs them from .whl/ (git-ignored).
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux1_x86_64 -d .whl $(MOSHI_SPEC) websockets==17.4 soundfile cffi pycparser soxr prometheus_client
