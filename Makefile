# Cairn — make targets. `make help` lists them.
#
# A newcomer runs two commands: `make up` (the whole chain on this machine)
# and `make test` (everything CI runs). Both work from a clean clone.

SHELL := /usr/bin/env bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

GO      ?= go
# go.mod's toolchain line names the patched Go every build uses; with auto,
# an older local Go (some machines default to GOTOOLCHAIN=local) fetches it
# once through the module proxy instead of building with known-vulnerable
# standard-library code.
export GOTOOLCHAIN := auto
BIN     := bin
TOOLS   := $(BIN)/tools
BUF     := $(TOOLS)/buf
GOVULNCHECK := $(TOOLS)/govulncheck
# How long `make fuzz-smoke` (and `make test`) runs each fuzz target, and
# the targets that run FUZZLONGTIME instead: the ciphertext parsers and the
# ceremony's share decoders, which take attacker-supplied bytes
# (tests/RELIABILITY.md rows 37 and 39).
FUZZTIME ?= 3s
FUZZLONGTIME ?= 60s
FUZZLONG ?= ./kms/keystore:FuzzDecrypt ./kms/transit:FuzzParseCiphertext ./kms:FuzzBatchCodec \
	./distributor:FuzzSubmitReleasedShare ./distributor:FuzzSubmitEnvelope
STATE   ?= .state
# Parallelism is bounded for the 2-core machines CI runs on.
TESTFLAGS ?= -race -count=1 -timeout 15m
BENCHFLAGS ?= -run '^$$' -bench . -benchmem -count 1

.PHONY: help
help: ## list targets
	@awk 'BEGIN{FS=":.*## "} /^[a-z][a-z-]*:.*## /{printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## build every binary into bin/
	@if [ -x $(BIN)/cairn ]; then echo "building the binaries into $(BIN)/ ..."; \
	  else echo "building the binaries into $(BIN)/ (first run: about a minute) ..."; fi
	$(GO) build -o $(BIN)/ ./cmd/...

.PHONY: deps
deps: ## install what the tests need (SoftHSM2), or say how
	@scripts/deps.sh

.PHONY: test
test: deps lint proto-check vulncheck ## vet, lint, check generated code, govulncheck, every test with -race, every fuzz target briefly
	$(GO) test $(TESTFLAGS) ./...
	@for m in $(DEPLOY_MODULES); do echo "cd $$m && go test"; (cd $$m && $(GO) test $(TESTFLAGS) ./...) || exit 1; done
	@FUZZLONG="$(FUZZLONG)" FUZZLONGTIME=$(FUZZLONGTIME) scripts/fuzz-smoke.sh $(FUZZTIME)

# Every fuzz target in the module (found with `go test -list`, so new ones
# are included), one at a time, FUZZTIME each.
.PHONY: fuzz-smoke
fuzz-smoke: ## run every fuzz target for FUZZTIME (3s) each, the FUZZLONG ones FUZZLONGTIME (60s)
	@FUZZLONG="$(FUZZLONG)" FUZZLONGTIME=$(FUZZLONGTIME) scripts/fuzz-smoke.sh $(FUZZTIME)

# The vulnerability database comes through the Go module proxy
# (golang.org/x/vulndb), indexed into bin/vulndb/; see the script.
.PHONY: vulncheck
vulncheck: $(GOVULNCHECK) ## govulncheck ./...: fail on reached vulnerabilities not explained in scripts/govulncheck.allow
	@scripts/govulncheck.sh $(GOVULNCHECK)

# The simulated year (tests/simyear): 365 days on a fake clock, the whole
# chain in-process. `make test` runs its 42-day plan under -race; the year
# takes about 2.5 minutes without -race (7+ with it) on 2 cores.
.PHONY: simyear
simyear: ## simulate a year of rotations (2 regions, a lagging region, a wiped server) and print the figures
	$(GO) test -count=1 -timeout 30m -run TestSimulatedYear -v ./tests/simyear/ -simyear.full

.PHONY: bench
bench: ## run the benchmarks once and print their figures
	$(GO) test $(BENCHFLAGS) ./...

# The chaos soak (tests/chaos): the whole chain under a continuous envelope
# workload while a seeded schedule kills, pauses and restarts its servers;
# the report closes the output. `make test` runs its short form (70 s of
# faults, about 1.5 minutes). SEED=n replays a run's schedule.
DURATION ?= 30m
SEED ?= 0
SOAKTIMEOUT ?= 3h
.PHONY: soak
soak: ## the chaos soak for DURATION (30m) and its report; SEED=n replays a schedule
	$(GO) test -race -count=1 -timeout $(SOAKTIMEOUT) -run '^TestChaosSoak$$' -v ./tests/chaos/ -chaos.duration $(DURATION) -chaos.seed $(SEED)

.PHONY: soak-mutants
soak-mutants: ## break each safeguard in tests/chaos/mutants on purpose; the short soak must catch every one
	SEED=$(if $(filter 0,$(SEED)),,$(SEED)) tests/chaos/mutants/run.sh

# The long root-tier outage (tests/RELIABILITY.md row 23):
# TestKMSServesWithRootKMSDown with the root KMS, the distributor and the
# safes down for OUTAGE under a paced wrap/unwrap load. `make test` runs it
# with a 20 s outage.
OUTAGE ?= 10m
.PHONY: soak-outage
soak-outage: ## the root tier down for OUTAGE (10m): every wrap/unwrap succeeds, new keyset fetches fail and succeed on retry
	$(GO) test -race -count=1 -timeout $(SOAKTIMEOUT) -run '^TestKMSServesWithRootKMSDown$$' -v ./tests/ -kms.outage $(OUTAGE)

# Go modules of their own under deploy/ (their dependencies stay out of
# go.mod): the Kubernetes manifests' test and the image builder. `./...` of
# the root module does not reach them.
DEPLOY_MODULES := deploy/kubernetes deploy/image

# Container images, one per binary, FROM scratch, built without a Docker
# daemon (deploy/image). IMAGEFLAGS passes flags, e.g.
# IMAGEFLAGS='-platforms linux/amd64,linux/arm64 -binaries kms,rootkms,distributor'.
IMAGEFLAGS ?=

.PHONY: image
image: ## container image tarballs of every binary into bin/images/ (no Docker daemon; see deploy/image)
	cd deploy/image && $(GO) run ./cmd/build-images -repo $(CURDIR) -out $(CURDIR)/$(BIN)/images $(IMAGEFLAGS)

# The out-of-process data-plane benchmark: the kms binary and a bare mTLS
# gRPC echo (the floor) as their own processes, load from the test process;
# the summary table (ratios last) closes the output. About 2 minutes.
E2EBENCHTIME ?= 2s
.PHONY: bench-e2e
bench-e2e: ## the data plane measured as users run it: KMS and floor out of process, figures and ratios
	$(GO) test -count=1 -timeout 20m -run '^$$' -bench 'BenchmarkDataPlaneE2E' -benchtime $(E2EBENCHTIME) -v ./tests/

.PHONY: lint
lint: $(BUF) ## gofmt, go vet, house rules (internal/lint), buf lint and breaking
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './bin/*')); \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	@for m in $(DEPLOY_MODULES); do echo "cd $$m && go vet"; (cd $$m && $(GO) vet ./...) || exit 1; done
	$(GO) test -count=1 ./internal/lint/
	$(BUF) lint
	@scripts/buf-breaking.sh $(BUF)

.PHONY: tools
tools: $(BUF) $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc $(TOOLS)/grpcurl $(GOVULNCHECK) ## build the pinned code generators, grpcurl and govulncheck into bin/tools

$(BUF): tools/go.mod tools/go.sum
	cd tools && GOBIN=$(CURDIR)/$(TOOLS) $(GO) install github.com/bufbuild/buf/cmd/buf

# grpcurl, pinned with buf in tools/go.mod: every server of `make up` answers
# it (gRPC reflection is on in the dev chain).
$(TOOLS)/grpcurl: tools/go.mod tools/go.sum
	cd tools && GOBIN=$(CURDIR)/$(TOOLS) $(GO) install github.com/fullstorydev/grpcurl/cmd/grpcurl

# govulncheck, pinned with buf in tools/go.mod.
$(GOVULNCHECK): tools/go.mod tools/go.sum
	cd tools && GOBIN=$(CURDIR)/$(TOOLS) $(GO) install golang.org/x/vuln/cmd/govulncheck

# The protoc plugins are pinned by go.mod's tool directives, so they always
# match the protobuf and gRPC runtime Cairn builds with.
$(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc: go.mod go.sum
	GOBIN=$(CURDIR)/$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc

.PHONY: proto
proto: tools ## regenerate the Go code of proto/ (byte-identical with the pinned generators)
	find proto -name '*.pb.go' -delete
	$(BUF) generate

.PHONY: proto-check
proto-check: proto ## fail if the committed generated code differs from a fresh `make proto`
	@if [ -n "$$(git status --porcelain -- proto)" ]; then \
	  echo "generated code in proto/ is stale or uncommitted; run 'make proto' and commit:"; \
	  git status --porcelain -- proto; git diff --stat -- proto; exit 1; fi

# `cairn up` reuses $(STATE)/up on the next run (a dev unseal ceremony instead
# of genesis); `make clean` or `rm -rf $(STATE)/up` starts over. UPFLAGS passes
# flags, e.g. UPFLAGS='--base-port 8100 --no-demo'.
UPFLAGS ?=

.PHONY: up
up: build ## start the whole chain on this machine and run a demo (Ctrl-C stops it)
	$(BIN)/cairn up --state-dir $(STATE)/up $(UPFLAGS)

.PHONY: clean
clean: ## remove build output and local state
	rm -rf $(BIN) $(STATE)
