# The commands the README names. Every target builds what it needs first,
# so `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py $(wildcard native/*.pyx native/*.pxd)

.PHONY: run test mcp-venvs fuzz fuzz-native test-pure bench bench-instructions protos check-protos lint clean

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	$(PY) setup.py -q build_ext --inplace
	touch $@

run: $(STAMP)
	$(VENV)/bin/agentauthz serve

# One pytest run covers both twins (native and pure, parametrised); test-pure
# first proves the package also selects and builds pure with the switch set.
# Cluster-mode tests start a real redis-server (Debian's package); the audit report's test opens the
# page in headless Chromium (Debian's chromium).
test: $(STAMP) mcp-venvs
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(MAKE) --no-print-directory test-pure
	$(PY) -m pytest -q

# The official MCP SDK, both lines, for tests/test_mcp_sdk.py: one package name, so one venv per line
# (the test extra cannot hold both); the stamp holds the requirement, which the test checks too.
MCP_SDK1 := mcp>=1.30,<2
MCP_SDK2 := mcp>=2.3,<3
mcp-venvs: .venv-mcp1/.installed-stamp .venv-mcp2/.installed-stamp
.venv-mcp%/.installed-stamp:
	$(PYTHON) -m venv .venv-mcp$*
	.venv-mcp$*/bin/python -m pip install -q '$(MCP_SDK$*)'
	echo '$(MCP_SDK$*)' > $@

# The fuzz tests (tests/test_fuzz_*.py, seeds in tests/corpus/) with many more examples than `make test`
# runs; FUZZ_ARGS passes pytest options, e.g. "--hypothesis-seed=1 -x".
FUZZ_ARGS ?=
fuzz: $(STAMP)
	$(PY) -m pytest tests -q -k fuzz --hypothesis-profile=fuzz --hypothesis-show-statistics $(FUZZ_ARGS)

# The native twin under libFuzzer (atheris), the pure twin as oracle and coverage map; crash-* files
# land in .fuzz/. FUZZ_SECONDS bounds the run.
FUZZ_SECONDS ?= 120
fuzz-native: $(STAMP)
	$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q atheris
	mkdir -p .fuzz/native && cp -n tests/corpus/tokens/*.jwt .fuzz/native/
	cd .fuzz && ../$(PY) ../tests/fuzz_native_atheris.py -max_total_time=$(FUZZ_SECONDS) -max_len=8192 native

test-pure: $(STAMP)
	AGENTAUTHZ_NO_EXTENSIONS=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_accel.py tests/test_build.py

# Micro benchmarks, then the load comparisons (h2load, Envoy, py-spy), then the report in
# benchmarks/results/ (results.json, report.md, PNG charts). 12-14 minutes on 2 cores.
# BENCH_LOAD_ARGS passes options to the load driver, e.g. "--duration 2 --rounds 3".
BENCH_RESULTS ?= benchmarks/results
BENCH_LOAD_ARGS ?=
bench: $(STAMP)
	command -v h2load >/dev/null || (apt-get update && apt-get install -y nghttp2-client)
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q matplotlib
	test -x $(VENV)/bin/py-spy || $(PY) -m pip install -q py-spy
	mkdir -p $(BENCH_RESULTS)
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,mean,ops,rounds \
		--benchmark-json $(BENCH_RESULTS)/micro.json
	$(PY) -m benchmarks.paired --out $(BENCH_RESULTS)/paired.json
	$(PY) -m benchmarks.load --out $(BENCH_RESULTS)/load.json $(BENCH_LOAD_ARGS)
	$(PY) -m benchmarks.load.cluster --out $(BENCH_RESULTS)
	$(PY) -m benchmarks.load.handlers --out $(BENCH_RESULTS)/handlers.json
	$(PY) -m benchmarks.load.http_check --out $(BENCH_RESULTS)
	$(PY) -m benchmarks.report --results $(BENCH_RESULTS)

# Instructions per Check under callgrind (floor, the bounds, agentauthz, the naive peer): the figure the
# machine's noise cannot move; ~4 minutes. The next `make bench` (or python -m benchmarks.report) puts it in the report.
bench-instructions: $(STAMP)
	command -v h2load >/dev/null || (apt-get update && apt-get install -y nghttp2-client)
	command -v valgrind >/dev/null || (apt-get update && apt-get install -y valgrind)
	mkdir -p $(BENCH_RESULTS)
	$(PY) -m benchmarks.load.instructions --out $(BENCH_RESULTS)/instructions.json
	$(PY) -m benchmarks.report --results $(BENCH_RESULTS)

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/agentauthz/v1/*.proto

# CI: generated code must match the .proto files it was made from.
check-protos: protos
	git diff --exit-code -- agentauthz/v1

lint: $(STAMP)
	$(VENV)/bin/ruff check agentauthz tests benchmarks
	$(VENV)/bin/mypy agentauthz
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layers.py

clean:
	rm -rf build $(VENV) .venv-mcp1 .venv-mcp2 agentauthz/*.so agentauthz/*/*.so native/*.c
