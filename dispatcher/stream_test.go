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
	"golang.org/x/sys/unix"
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
	logs := &syncBuffer{}
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
	// 2 × 2 MB into a 64 KiB pipe: every worker's output fills it.
	waitFor(t, 20*time.Second, "a full pipe", func() bool {
		n, err := unix.IoctlGetInt(int(r.Fd()), unix.TIOCINQ) // FIONREAD
		return err == nil && n >= 48<<10
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
	waitFor(t, 20*time.Second, "lines dropped", func() bool {
		return strings.Contains(logs.String(), "stdout is not draining: dropping lines of worker")
	})

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

// blockingWriter is an io.Writer whose writes wait until release is
// closed, then fail with err (nil: succeed).
type blockingWriter struct {
	release chan struct{}
	err     error
	out     syncBuffer
}

func (b *blockingWriter) Write(p []byte) (int, error) {
	<-b.release
	if b.err != nil {
		return 0, b.err
	}
	return b.out.Write(p)
}

// TestStreamDropsAndCounts: with a writer stuck in a write, puts that do
// not wait never block, what does not fit is dropped, and the count is
// exact when the source's lines flow again.
func TestStreamDropsAndCounts(t *testing.T) {
	t.Parallel()
	bw := &blockingWriter{release: make(chan struct{})}
	var notices syncBuffer
	s := newStream("stdout", bw)
	s.notice = func(m string) { notices.Write([]byte(m + "\n")) }
	src := workerTag{index: 2, pid: 7}
	line := []byte(strings.Repeat("x", 1023) + "\n")
	s.put(src, line, false) // taken by the writer, which blocks
	waitFor(t, 5*time.Second, "writer busy", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return !s.writing.IsZero()
	})
	start := time.Now()
	for range 1000 {
		s.put(src, line, false)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("1000 puts into a stuck stream took %s", took)
	}
	queued := perSourceQueue / len(line) // 256
	close(bw.release)
	waitFor(t, 5*time.Second, "queue written", func() bool {
		return strings.Count(bw.out.String(), "\n") == 1+queued
	})
	s.put(src, []byte("again\n"), false)
	if !s.close(5 * time.Second) {
		t.Fatal("writer did not end")
	}
	want := "stdout is not draining: dropping lines of worker 2 (pid 7) until it does\n" +
		"dropped " + strconv.Itoa(1000-queued) + " lines of worker 2 (pid 7): stdout was not taking them fast enough\n"
	if notices.String() != want {
		t.Errorf("notices:\n%s\nwant\n%s", notices.String(), want)
	}
	if got := strings.Count(bw.out.String(), "\n"); got != 1+queued+1 {
		t.Errorf("%d lines written, want %d", got, 1+queued+1)
	}
}

// TestStreamBrokenPipe: a write that fails (EPIPE) is said once; later
// lines are dropped without blocking.
func TestStreamBrokenPipe(t *testing.T) {
	t.Parallel()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	defer w.Close()
	var notices syncBuffer
	s := newStream("stdout", w)
	s.notice = func(m string) { notices.Write([]byte(m + "\n")) }
	for range 100 {
		s.put(workerTag{index: 0, pid: 1}, []byte("line\n"), true)
	}
	waitFor(t, 5*time.Second, "broken", func() bool { return strings.Contains(notices.String(), "broken pipe") })
	start := time.Now()
	for range 1000 {
		s.put(workerTag{index: 0, pid: 1}, []byte("line\n"), true)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("puts into a broken stream took %s", took)
	}
	if !s.close(time.Second) {
		t.Error("writer of a broken stream did not end")
	}
	if n := strings.Count(notices.String(), "failed"); n != 1 {
		t.Errorf("%d failure notices, want 1:\n%s", n, notices.String())
	}
}
