# cohort's build entry points. `make test` is the command the README and CI run.
GO      ?= go
BIN     := bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo 0.0.0-dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
STATICCHECK_VERSION := v0.8.2

.PHONY: all build deps test lint fuzz bench bench-cost bench-micro deb vmtest vmtest-qemu run clean

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/...
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/cohort-hello ./examples/hello

# The whole suite: lint, unit and integration tests (with every fuzz
# target's seed corpus; `make fuzz` mutates), then the end-to-end tests
# under a real systemd, in containers and in QEMU.
test: deps lint
	$(GO) test -count=1 -race -timeout 15m ./...
	$(MAKE) vmtest
	$(MAKE) vmtest-qemu

# Debian packages the tests use (systemd-analyze, python3, node, debootstrap, …).
deps:
	.ci/deps

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo 'gofmt: files above need formatting'; exit 1; }
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...
	$(GO) test -count=1 -run '^TestImportDirections$$' ./internal/layout

# Short coverage-guided runs of every fuzz target (the seed corpora also run
# in `go test`). A worker minimizes each new interesting input for up to
# -fuzzminimizetime (60 s by default), uncounted: a 10 s run that finds one
# early spends the rest minimizing and reports a stalled exec count, as
# FuzzRecv did (6,908 execs in 60 s, against about 2,000/s fuzzing).
FUZZFLAGS ?= -fuzzminimizetime 3s
fuzz:
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParse$$' -fuzztime 20s ./appfile
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParseDuration$$' -fuzztime 10s ./appfile
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParseSlotFDName$$' -fuzztime 10s ./appfile
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzRender$$' -fuzztime 20s ./generator
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzCheckShape$$' -fuzztime 20s ./appfile
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParse$$' -fuzztime 10s ./generator/verify
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParse$$' -fuzztime 20s ./dispatcher/internal/notify
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParse$$' -fuzztime 20s ./activation/rr
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParseRequest$$' -fuzztime 10s ./dispatcher/control
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParseStat$$' -fuzztime 10s ./dispatcher/internal/procfs
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzRecv$$' -fuzztime 10s ./activation/rr
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParseSyscall$$' -fuzztime 10s ./dispatcher/internal/probe
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzEpollTargets$$' -fuzztime 10s ./dispatcher/internal/probe
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzProcText$$' -fuzztime 10s ./dispatcher/internal/probe
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzSummary$$' -fuzztime 10s ./appfile
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzCgroupLimit$$' -fuzztime 10s ./internal/cpuset
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzAppend$$' -fuzztime 10s ./internal/logline
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParse$$' -fuzztime 10s ./internal/cgroup
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzReplies$$' -fuzztime 10s ./dispatcher/internal/sockdiag
	$(GO) test -run '^$$' $(FUZZFLAGS) -fuzz '^FuzzParseProxy$$' -fuzztime 10s ./dispatcher/internal/balance

# The load benchmark (bench/): the hello app alone and under Node
# cluster, PM2 and cohort, keep-alive and new-connection load; writes
# docs/bench/results.{md,svg,json} and prints each target with PASS/MISS.
bench: build
	bench/deps.sh
	$(GO) run ./bench/cmd/cohort-bench -cohort $(BIN)/cohort -out docs/bench

# Go micro-benchmarks beside the code (BenchmarkPassFD, BenchmarkGenerate100, …),
# each printing its ratio against a baseline from the same run.
# The cost benchmark (issue 19): CPU per handed connection of the dispatcher and of
# Node's SCHED_RR primary, over a fixed number of connections, in one run.
bench-cost: build
	$(GO) run ./bench/cmd/cohort-bench -cost -cohort $(BIN)/cohort

bench-micro:
	$(GO) test -run '^$$' -bench . -benchtime 2s ./...

deb:
	packaging/build-deb.sh $(VERSION)

# The scenarios in systemd-nspawn containers (TestSystemd and the rest).
vmtest:
	COHORT_VMTEST=1 $(GO) test -count=1 -timeout 20m -v -skip '^TestQEMU$$' ./vmtests/

# The scenarios that need a kernel with cgroup2 controllers, in QEMU
# guests under TCG (vmtests/README.md: "QEMU").
vmtest-qemu:
	COHORT_VMTEST=1 $(GO) test -count=1 -timeout 40m -v -run '^TestQEMU$$' ./vmtests/

# The README's "main job": the example worker on 127.0.0.1:8080, one per CPU.
# examples/hello.toml runs "cohort-hello", found on PATH.
run: build
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cohort run examples/hello.toml

clean:
	rm -rf $(BIN) dist
