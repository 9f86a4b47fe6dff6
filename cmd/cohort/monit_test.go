package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testproc"
	"github.com/cohort-dev/cohort/internal/testsync"
	"github.com/cohort-dev/cohort/internal/testterm"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// TestMonitInTerminal: cohort monit in a real terminal (tmux) shows a
// `cohort run` app's workers; its keys scale, restart a worker and reload,
// and each shows up as an event and in the table; q ends it. Meanwhile it
// costs the dispatcher no measurable CPU at the default 1 s refresh
// (CPU time from /proc, against the same dispatcher idle just before)
// and itself stays under 2 % of a CPU.
func TestMonitInTerminal(t *testing.T) {
	py := testtool.System(t, "python3")
	script, _ := filepath.Abs(filepath.Join("..", "..", "examples", "python", "shared_worker.py"))
	// The binary as users get it: the CPU figures of this race-built test
	// binary would say nothing.
	bin := filepath.Join(t.TempDir(), "cohort")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	// A name of its own, and monit shown only it: other apps on this host
	// (another test's) are not this test's to scale.
	app := fmt.Sprintf("mon%d", os.Getpid())
	mark := "COHORT_TEST_MARK=" + t.TempDir()
	run := exec.Command(bin, "run", "--listen", "http=127.0.0.1:0", "--workers", "2", "--ready", "notify", "--name", app, "--", py, script)
	run.Env = append(os.Environ(), mark)
	var runErr testsync.Buffer
	run.Stderr = &runErr
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := make(chan struct{})
	go func() { run.Wait(); close(reaped) }()
	t.Cleanup(func() {
		run.Process.Signal(syscall.SIGTERM)
		select {
		case <-reaped:
		case <-time.After(20 * time.Second):
			run.Process.Kill()
			<-reaped
		}
		testproc.KillMarked(mark)
		if t.Failed() {
			t.Logf("cohort run:\n%s", runErr.String())
		}
	})
	var sock string
	testsync.WaitFor(t, 30*time.Second, "cohort run's control socket", func() bool {
		if m := controlRE.FindStringSubmatch(runErr.String()); m != nil {
			sock = m[1]
		}
		return sock != ""
	})
	st := waitStatus(t, sock, func(st *control.Status) bool { return strings.HasPrefix(st.Line, "2/2 workers ready") })
	dispatcher := st.PID

	// The dispatcher idle, with no one asking.
	const window = 20 * time.Second
	idle := cpuTicks(t, dispatcher)
	time.Sleep(window)
	idle = cpuTicks(t, dispatcher) - idle

	pane := testterm.Start(t, 150, 40, nil, bin, "monit", app)
	pane.WaitFor(t, 20*time.Second, app+".0", app+".1", "2/2 ready · gen 1 · shared", "cohort monit")
	monit := pane.PID(t)
	before, monitBefore := cpuTicks(t, dispatcher), cpuTicks(t, monit)
	time.Sleep(window)
	watched, monitUsed := cpuTicks(t, dispatcher)-before, cpuTicks(t, monit)-monitBefore
	hz := 100.0 // USER_HZ on Linux
	pct := func(ticks int64) float64 { return float64(ticks) / hz / window.Seconds() * 100 }
	t.Logf("over %v: dispatcher idle %d ticks (%.2f%% CPU), with monit at 1s %d ticks (%.2f%%); monit itself %d ticks (%.2f%% CPU)",
		window, idle, pct(idle), watched, pct(watched), monitUsed, pct(monitUsed))
	switch {
	case pct(monitUsed) >= 2:
		t.Errorf("monit used %.2f%% of a CPU, want < 2%%", pct(monitUsed))
	case pct(watched-idle) > 0.5:
		// A status a second reads /proc for two workers: a few ms a
		// second at most; more than 0.5 % of a CPU would be measurable.
		t.Errorf("the dispatcher used %.2f%% of a CPU more with monit watching", pct(watched-idle))
	}

	// The first row is the app: + scales it up.
	pane.Keys(t, "+")
	pane.WaitFor(t, 20*time.Second, app+": scale to 3 done", app+": 2 → 3 workers", app+".2")
	// Down to worker 0, restart it.
	pane.Keys(t, "Down")
	pane.Keys(t, "R")
	pane.WaitFor(t, 30*time.Second, app+": restart of worker 0 done", app+".0 replaced")
	pane.Keys(t, "r")
	pane.WaitFor(t, 60*time.Second, app+": reload done", app+": generation 1 → 2 (reload)")
	pane.Keys(t, "-")
	screen := pane.WaitFor(t, 20*time.Second, app+": scale to 2 done", app+": 3 → 2 workers")
	t.Logf("cohort monit in tmux:\n%s", screen)
	if st := waitStatus(t, sock, func(st *control.Status) bool { return len(st.Workers) == 2 }); st.Generation != 2 {
		t.Errorf("after the keys: %+v", st)
	}
	pane.Keys(t, "q")
	deadline := time.Now().Add(10 * time.Second)
	for alive := true; alive; {
		_, err := os.Stat(fmt.Sprintf("/proc/%d/stat", monit))
		if alive = err == nil && testproc.State(monit) != "Z"; alive && time.Now().After(deadline) {
			t.Fatalf("monit (pid %d) still runs after q", monit)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitStatus asks the control socket at sock until ok(status) holds.
func waitStatus(t *testing.T, sock string, ok func(*control.Status) bool) *control.Status {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := fetchStatus(t.Context(), sock)
		if err == nil && ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			b, _ := json.Marshal(st)
			t.Fatalf("status of %s: %v %s", sock, err, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// cpuTicks is pid's user + system CPU time in clock ticks.
func cpuTicks(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatalf("cpu of %d: %v", pid, err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s
}
