package main

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
)

type stubDispatcher struct {
	scaled int
	// The last signal request: its signal and worker (-1: all).
	sig    syscall.Signal
	worker int
}

func (s *stubDispatcher) Status(ctx context.Context) (*control.Status, error) {
	// 89.5 s ago: an uptime read up to 1 s later still rounds to 1m30s
	// (TestStatusAll failed with 1m31s on a loaded machine).
	started := time.Now().Add(-89500 * time.Millisecond)
	return &control.Status{App: "web", Mode: "round-robin", Generation: 2, State: "ready", PID: 4242, Since: started.Add(-time.Hour), Line: "2/2 workers ready · gen 2 · round-robin · 1 restart",
		CPUs: control.CPUs{Count: 1, How: "affinity 2, cgroup cpu quota 1.50", WorkersAuto: true},
		Workers: []control.Worker{
			{Index: 0, PID: 101, Generation: 2, State: "ready", Started: started, Restarts: 4, RestartCauses: map[string]int{"unhealthy": 1, "crashed": 2, "oom_killed": 1}, Handed: 500, Active: 3, RSS: 30 << 20, CPUPercent: 12.5},
			{Index: 1, Generation: 2, State: "backoff", Recycles: 2, LastRecycle: "memory 512M > 400M"},
		}, Recycles: 2, RecycleMemory: "over 400M, each worker's process-tree RSS from /proc (no per-worker cgroup)"}, nil
}
func (s *stubDispatcher) Reload(ctx context.Context) error { return nil }
func (s *stubDispatcher) Scale(ctx context.Context, n int) error {
	s.scaled = n
	return nil
}
func (s *stubDispatcher) RestartWorker(ctx context.Context, i int) error {
	return errors.New("not here")
}

// The control socket is real; the dispatcher behind it is a stub, because
// what is tested here is the command's request and its table.
func TestStatusAndScale(t *testing.T) {
	srv, err := control.Listen(filepath.Join(t.TempDir(), control.SocketName), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	stub := &stubDispatcher{}
	go func() { done <- srv.Serve(ctx, stub) }()
	t.Cleanup(func() { cancel(); <-done })

	code, out, errOut := runCohort(t, nil, "status", "--socket", srv.Path())
	if code != 0 {
		t.Fatalf("status: %d %s", code, errOut)
	}
	for _, want := range []string{
		"web: 2/2 workers ready · gen 2 · round-robin · 1 restart\nweb: workers auto = 1 (affinity 2, cgroup cpu quota 1.50)\n",
		"WORKER  PID  GEN  STATE    UPTIME  RESTARTS  CONNS  RSS    CPU%",
		"0       101  2    ready    1m30s   4         3/500  30.0M  12.5",
		"web.0: restarted 4 times: crashed 2, oom_killed 1, unhealthy 1\n", // most frequent first, then by name
		"1       -    2    backoff  -       0         0/0    -      0.0",
		"web: recycle memory over 400M, each worker's process-tree RSS from /proc (no per-worker cgroup)\n",
		"web.1: recycled 2 times, last: memory 512M > 400M\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	code, out, _ = runCohort(t, nil, "status", "--json", "--socket", srv.Path())
	if code != 0 || !strings.Contains(out, `"rss_bytes": 31457280`) || !strings.Contains(out, `"how": "affinity 2, cgroup cpu quota 1.50"`) || !strings.Contains(out, `"last_recycle": "memory 512M > 400M"`) {
		t.Errorf("status --json: %d\n%s", code, out)
	}
	if code, _, errOut := runCohort(t, nil, "scale", "--socket", srv.Path(), "web", "3"); code != 0 || stub.scaled != 3 {
		t.Errorf("scale: %d %s (scaled %d)", code, errOut, stub.scaled)
	}
	if code, _, errOut := runCohort(t, nil, "scale", "web", "0"); code != 2 || !strings.Contains(errOut, "N must be a number from 1 to 1024") {
		t.Errorf("scale 0: %d %s", code, errOut)
	}
}

func TestStatusWithoutDispatcher(t *testing.T) {
	code, _, errOut := runCohort(t, nil, "status", "--socket", filepath.Join(t.TempDir(), "none.sock"), "web")
	if code != 1 || !strings.Contains(errOut, "connect to control socket") || !strings.Contains(errOut, "systemctl status web") {
		t.Errorf("status of a stopped app: %d %s", code, errOut)
	}
	if code, _, errOut := runCohort(t, nil, "status", "../etc"); code != 2 || !strings.Contains(errOut, "app name") {
		t.Errorf("status of a bad name: %d %s", code, errOut)
	}
}

// TestCPUsLine: a fixed count says what COHORT_CPUS is instead; an older
// dispatcher that sends no count gets no line.
func TestCPUsLine(t *testing.T) {
	for c, want := range map[control.CPUs]string{
		{Count: 2, How: "affinity 2", WorkersAuto: true}:     "workers auto = 2 (affinity 2)",
		{Count: 1, How: "affinity 2, cgroup cpu quota 1.50"}: "COHORT_CPUS = 1 (affinity 2, cgroup cpu quota 1.50)",
		{}: "",
	} {
		if got := cpusLine(c); got != want {
			t.Errorf("cpusLine(%+v) = %q, want %q", c, got, want)
		}
	}
}

func (s *stubDispatcher) Signal(ctx context.Context, sig syscall.Signal, worker *int) ([]int, error) {
	s.sig, s.worker = sig, -1
	if worker != nil {
		s.worker = *worker
	}
	return []int{42, 43}, nil
}

// TestPrintCgroups: the cgroup table shows each worker's own cgroup
// figures, "-" for what its cgroup does not count, and nothing at all
// when no worker has a cgroup.
func TestPrintCgroups(t *testing.T) {
	mem := uint64(48 << 20)
	st := &control.Status{Workers: []control.Worker{
		{Index: 0, Cgroup: &control.Cgroup{Path: "/sys/fs/cgroup/system.slice/web.service/w0-g2-7", MemoryCurrent: &mem, MemoryMax: 512 << 20,
			CPUUsageUsec: 1500000, CPUThrottledUsec: 250000, MemoryHighEvents: 3, OOMKills: 1,
			MemoryPressure: &control.Pressure{Some10: 1.25}, CPUPressure: &control.Pressure{Some10: 0.5}}},
		{Index: 1, Cgroup: &control.Cgroup{Path: "/x/w1-g2-8"}},
		{Index: 2},
	}}
	var out strings.Builder
	printCgroups(&environment{stdout: &out}, st)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	want := [][]string{
		{"WORKER", "CGROUP", "MEM", "MEM", "MAX", "CPU", "TIME", "THROTTLED", "HIGH", "OOM", "KILLS", "PSI", "MEM", "PSI", "CPU"},
		{"0", "w0-g2-7", "48.0M", "512.0M", "1.5s", "250ms", "3", "1", "1.25", "0.50"},
		{"1", "w1-g2-8", "-", "-", "0s", "0s", "0", "0", "-", "-"},
	}
	if len(lines) != len(want) {
		t.Fatalf("cgroup table:\n%s", out.String())
	}
	for i, l := range lines {
		if got := strings.Fields(l); strings.Join(got, " ") != strings.Join(want[i], " ") {
			t.Errorf("line %d: %q, want %q", i, got, want[i])
		}
	}
	out.Reset()
	printCgroups(&environment{stdout: &out}, &control.Status{Workers: []control.Worker{{Index: 0}}})
	if out.Len() != 0 {
		t.Errorf("a table without cgroups:\n%s", out.String())
	}
}
