# Everything runs from the repo-local virtualenv; `make run` and `make test` set it up first.
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO := protos/orchestrator/v1/orchestrator.proto
GEN_DIR := generated
# The contract as last released: `buf breaking` fails on any change incompatible with it.
RELEASED := releases/v0.1
BUF ?= $(BIN)/buf
ORCHESTRATOR_PORT ?= 50051
ORCHESTRATOR_HTTP_PORT ?= 8080

.PHONY: install browser run test test-fast generate check-generated lint buf-lint buf-breaking bench clean \
  web web-install check-web

install: $(STAMP)

# The three distributions (README "Packages"), each installed editable: stubs, client, server.
PACKAGES := -e ./generated -e ./clients -e '.[dev]'

# Re-install only when the packaging changes; an editable install picks up code changes.
# (`orchestrator` is the single distribution this repo used to install: it goes.)
$(STAMP): pyproject.toml generated/pyproject.toml clients/pyproject.toml
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip uninstall --quiet --yes orchestrator 2>/dev/null || true
	$(PY) -m pip install --quiet --disable-pip-version-check $(PACKAGES)
	touch $(STAMP)

run: install
	@echo "gRPC on 127.0.0.1:$(ORCHESTRATOR_PORT); dashboard, Connect and gRPC-Web on http://127.0.0.1:$(ORCHESTRATOR_HTTP_PORT)/"
	ORCHESTRATOR_PORT=$(ORCHESTRATOR_PORT) ORCHESTRATOR_HTTP_PORT=$(ORCHESTRATOR_HTTP_PORT) $(BIN)/orchestrator serve

# protoc comes from grpcio-tools (pinned), so the generated code matches the protobuf runtime.
# buf lints and checks breaking changes; it cannot drive grpc's python generator locally.
# What the stubs distribution ships: protoc's output, py.typed (so a caller's mypy reads the
# .pyi files, PEP 561) and the .proto itself.
PROTOC = PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
  --python_out=$(1) --grpc_python_out=$(1) --mypy_out=quiet:$(1) --mypy_grpc_out=quiet:$(1) \
  --connectrpc_out=$(1) --connectrpc_opt=protobuf=google \
  $(PROTO) && touch $(1)/orchestrator/v1/py.typed && cp $(PROTO) $(1)/orchestrator/v1/

generate: install
	rm -rf $(GEN_DIR)/orchestrator
	mkdir -p $(GEN_DIR)
	$(call PROTOC,$(GEN_DIR))

check-generated: install
	@tmp=$$(mktemp -d) && \
	$(call PROTOC,$$tmp) && \
	if diff -r $$tmp/orchestrator $(GEN_DIR)/orchestrator; then rm -rf $$tmp; echo "generated code is up to date"; \
	else rm -rf $$tmp; echo "generated/ differs from protos/: run 'make generate' and commit"; exit 1; fi

# The dashboard (web/: TypeScript, Preact, Connect-web), bundled into the server package so
# `make run` needs no Node. `make web` regenerates web/src/gen (protoc-gen-es, from protos/
# and google/rpc/error_details.proto), type-checks and bundles; `make check-web` (part of
# `make test`) fails when the committed code or bundle is not what the sources build.
WEB_BIN := $(CURDIR)/web/node_modules/.bin
DASHBOARD := server/orchestrator/server/dashboard
GOOGLEAPIS = $$($(PY) -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(list(google.rpc.__path__)[0])))')
ES_GEN = PATH="$(WEB_BIN):$$PATH" $(PY) -m grpc_tools.protoc -I protos -I $(GOOGLEAPIS) \
  --es_out=$(1) --es_opt=target=ts,import_extension=none \
  orchestrator/v1/orchestrator.proto google/rpc/error_details.proto
ES_BUNDLE = cd web && $(WEB_BIN)/tsc -p . && $(WEB_BIN)/esbuild src/main.tsx --bundle --minify \
  --format=esm --target=es2022 --jsx=automatic --jsx-import-source=preact --legal-comments=none \
  --log-level=warning --outfile=$(1)/app.js && cp index.html $(1)/index.html

web/node_modules/.installed: web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	touch $@

web-install: web/node_modules/.installed

web: install web-install
	rm -rf web/src/gen && mkdir -p web/src/gen $(DASHBOARD)
	$(call ES_GEN,web/src/gen)
	$(call ES_BUNDLE,$(CURDIR)/$(DASHBOARD))

check-web: install web-install
	@tmp=$$(mktemp -d) && mkdir -p $$tmp/gen $$tmp/bundle && \
	$(call ES_GEN,$$tmp/gen) && ($(call ES_BUNDLE,$$tmp/bundle)) && \
	if diff -r $$tmp/gen web/src/gen && diff -r $$tmp/bundle $(DASHBOARD); then rm -rf $$tmp; echo "dashboard bundle is up to date"; \
	else rm -rf $$tmp; echo "the dashboard differs from web/: run 'make web' and commit"; exit 1; fi

buf-lint: install
	$(BUF) lint

# No install prerequisite: tests run this target on a scratch copy with BUF set.
buf-breaking:
	$(BUF) breaking --against $(RELEASED)

lint: install
	$(BIN)/ruff check server clients tests
	$(BIN)/ruff format --check server clients tests
	$(BIN)/mypy --strict server clients tests

# The browser tests (tests/test_dashboard.py) drive Debian's Chromium: installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install browser lint buf-lint buf-breaking check-generated check-web
	$(BIN)/pytest -q

bench: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e ./generated -e ./clients -e '.[dev,bench]'
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
