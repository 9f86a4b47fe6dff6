package dispatcher

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// TestOutputPipeNobodyReads (issue 14.4): worker output into a real pipe
// that nobody reads never freezes supervision: status answers, a killed
// worker is restarted, a stop ends in time, and the log says how many
// lines of which worker were dropped. At 57c59ff the writer blocked in
// write(2) holding the output mutex, and the loop with it at its next log
// line.
func TestOutputPipeNobodyReads(t *testing.T) {
	t.Parallel()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	// Registered after startRun's cleanup, so run before it: closing the
	// read end fails a write still blocked at 57c59ff with EPIPE.
	defer r.Close()
	l, _ := tcpListener(t, "http")
	app := testApp(t, 2, map[string]string{
		"COHORT_TEST_HELPER": "printer", "HELPER_LINES": strings.Repeat("o", 99),
		"HELPER_REPEAT": "20000", "HELPER_EXIT": "hang",
	})
	app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
	logs := &testsync.Buffer{}
	opt := Options{App: app, Listeners: []*os.File{l}, Stdout: w, Stderr: logs, RuntimeDir: t.TempDir()}
	rec, stop := startRun(t, opt)
	sock := filepath.Join(opt.RuntimeDir, control.SocketName)
	status := func() *control.Status {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		rep, err := control.Call(ctx, sock, control.Request{Cmd: control.CmdStatus})
		if err != nil {
			t.Fatalf("status while stdout does not drain: %v", err)
		}
		return rep.Status
	}
	// 2 × 2 MB into the pipe: every worker's output fills it, and the
	// writer stays stuck. Its own notice is the proof, not FIONREAD: a
	// pipe is full when its 16 page slots are, which partial pages can
	// make well short of 64 KiB (it failed CI at 48 KiB).
	testsync.WaitFor(t, 20*time.Second, "a full pipe", func() bool {
		return strings.Contains(logs.String(), "stdout is not draining: dropping lines of worker")
	})
	st := status()
	if len(st.Workers) != 2 {
		t.Fatalf("status: %+v", st)
	}
	from := 0
	syscall.Kill(st.Workers[1].PID, syscall.SIGKILL)
	rec.wait(t, &from, 5*time.Second, "exit of the killed worker", func(e Event) bool { return e.Kind == WorkerExited && e.PID == st.Workers[1].PID })
	rec.wait(t, &from, 5*time.Second, "its restart", func(e Event) bool { return e.Kind == WorkerStarted && e.Worker == 1 })
	status()

	start := time.Now()
	if err := stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("stop with a stdout nobody reads took %s", took)
	}
	m := regexp.MustCompile(`dropped (\d+) lines of worker (\d) \(pid (\d+)\): stdout was not taking them fast enough`).FindAllStringSubmatch(logs.String(), -1)
	dropped := map[string]int{}
	for _, g := range m {
		n, _ := strconv.Atoi(g[1])
		dropped[g[3]] += n
	}
	// Worker 0 ran throughout: lines of it were dropped, and said so
	// (TestStreamDropsAndCounts checks that the count is exact).
	if n := dropped[strconv.Itoa(st.Workers[0].PID)]; n == 0 {
		t.Errorf("no dropped lines reported for worker 0 (pid %d): %v", st.Workers[0].PID, m)
	}
}
