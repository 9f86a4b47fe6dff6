package logrelay

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// child starts a real process whose stdout is a pipe and returns it with
// the pipe's read end; it is killed at cleanup.
func child(t *testing.T, cmd *exec.Cmd) (*exec.Cmd, *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd, r
}

// printer is a shell writing n lines "line", then exiting 0 or, with
// exit "kill", killing itself.
func printer(line string, n int, exit string) *exec.Cmd {
	script := fmt.Sprintf("yes '%s' | head -n %d", line, n)
	if exit == "kill" {
		script += "; kill -9 $$"
	}
	return exec.Command("/bin/sh", "-c", script)
}

// TestRateLimitBudget: a worker writing more than its budget loses the
// rest of the window's lines, and its exit says how many; another
// worker's lines all pass; the dispatcher's own lines are not limited.
func TestRateLimitBudget(t *testing.T) {
	t.Parallel()
	var stdout, log testsync.Buffer
	o := New(Config{App: "a", Stdout: &stdout, Stderr: &log, RateLimit: appfile.LogRateLimit{Interval: time.Hour, Burst: 100}})
	noisy, noisyR := child(t, printer("noisy", 10000, "0"))
	_, quietR := child(t, printer("quiet", 80, "0"))
	var wg sync.WaitGroup
	wg.Go(func() { o.CopyLines(Tag{Index: 0, PID: noisy.Process.Pid, Gen: 1}, noisyR) })
	wg.Go(func() { o.CopyLines(Tag{Index: 1, PID: 4242, Gen: 1}, quietR) })
	wg.Wait()
	for range 300 {
		o.Infof("the dispatcher's own line")
	}
	o.Close()
	out, lg := stdout.String(), log.String()
	if n := strings.Count(out, "a.0 | noisy\n"); n != 100 {
		t.Errorf("worker 0: %d lines passed, want its budget of 100", n)
	}
	if n := strings.Count(out, "a.1 | quiet\n"); n != 80 {
		t.Errorf("worker 1: %d lines passed, want all 80", n)
	}
	want := fmt.Sprintf("worker 0 (pid %d): 9,900 lines suppressed in its last ", noisy.Process.Pid)
	if !strings.Contains(lg, want) || !strings.Contains(lg, ", before it exited (log_rate_limit_burst = 100 lines per 1h0m0s per worker)\n") {
		t.Errorf("log %q; want a line with %q", lg, want)
	}
	if strings.Contains(lg, "worker 1") {
		t.Errorf("worker 1 was limited: %q", lg)
	}
	if n := strings.Count(lg, "the dispatcher's own line"); n != 300 {
		t.Errorf("%d of the dispatcher's 300 lines in its log", n)
	}
}

// TestRateLimitWindow: a worker that stays after overrunning its budget
// hears of it when the window ends, and its lines pass again in the next
// window.
func TestRateLimitWindow(t *testing.T) {
	t.Parallel()
	const interval = 300 * time.Millisecond
	var stdout, log testsync.Buffer
	o := New(Config{App: "a", Stdout: &stdout, Stderr: &log, RateLimit: appfile.LogRateLimit{Interval: interval, Burst: 10}})
	// 100 lines in one write, then, once their window has been reported,
	// 100 more. The test writes them itself: a shell's "sleep" between
	// two batches raced the window's timer on a loaded machine (CI).
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	pid := os.Getpid() // a label here; the relay sends it no signal
	defer func() {
		if t.Failed() { // what the relay said, to tell a late window from a split one
			t.Logf("the relay's log:\n%s", log.String())
		}
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		o.CopyLines(Tag{Index: 0, PID: pid, Gen: 1}, r)
	}()
	batch := func(from int) {
		var b strings.Builder
		for i := from; i < from+100; i++ {
			fmt.Fprintf(&b, "%d\n", i)
		}
		if _, err := io.WriteString(w, b.String()); err != nil { // under PIPE_BUF: one write, one read
			t.Fatal(err)
		}
	}
	suppressed := regexp.MustCompile(fmt.Sprintf(`worker 0 \(pid %d\): 90 lines suppressed in the last (\d+ms)`, pid))
	reported := func(n int) func() bool {
		return func() bool { return len(suppressed.FindAllString(log.String(), -1)) >= n }
	}
	batch(1)
	testsync.WaitFor(t, 5*time.Second, "the first window's suppressed lines", reported(1))
	batch(101)
	testsync.WaitFor(t, 5*time.Second, "the second window's suppressed lines", reported(2))
	if n := len(suppressed.FindAllString(log.String(), -1)); n != 2 {
		t.Errorf("%d windows reported, want 2:\n%s", n, log.String())
	}
	for _, m := range suppressed.FindAllStringSubmatch(log.String(), -1) {
		if d, _ := time.ParseDuration(m[1]); d < interval || d > interval+200*time.Millisecond {
			t.Errorf("%q: want a window of about %s", m[0], interval)
		}
	}
	w.Close()
	<-done
	o.Close()
	var lines []string
	for _, l := range strings.Split(stdout.String(), "\n") {
		if l != "" {
			lines = append(lines, strings.TrimPrefix(l, "a.0 | "))
		}
	}
	want := "1 2 3 4 5 6 7 8 9 10 101 102 103 104 105 106 107 108 109 110"
	if got := strings.Join(lines, " "); got != want {
		t.Errorf("lines passed: %s\nwant %s", got, want)
	}
}

// TestRateLimitSlot: a worker's replacement (a new pid in the same slot)
// does not get a fresh budget within the window.
func TestRateLimitSlot(t *testing.T) {
	t.Parallel()
	var stdout, log testsync.Buffer
	o := New(Config{App: "a", Stdout: &stdout, Stderr: &log, RateLimit: appfile.LogRateLimit{Interval: time.Hour, Burst: 10}})
	first, r := child(t, printer("first", 10, "kill"))
	o.CopyLines(Tag{Index: 0, PID: first.Process.Pid, Gen: 1}, r)
	again, r := child(t, printer("again", 5, "0"))
	o.CopyLines(Tag{Index: 0, PID: again.Process.Pid, Gen: 2}, r)
	o.Close()
	if n, m := strings.Count(stdout.String(), "first"), strings.Count(stdout.String(), "again"); n != 10 || m != 0 {
		t.Errorf("%d lines of the first worker and %d of its replacement passed; want 10 and 0", n, m)
	}
	if !strings.Contains(log.String(), fmt.Sprintf("worker 0 (pid %d): 5 lines suppressed in its last", again.Process.Pid)) {
		t.Errorf("the replacement's suppressed lines are not reported:\n%s", log.String())
	}
}

// TestRateLimitOff: a zero interval or burst is no limit.
func TestRateLimitOff(t *testing.T) {
	for _, l := range []appfile.LogRateLimit{{}, {Interval: time.Second}, {Burst: 5}} {
		if newLimiter(l, nil) != nil {
			t.Errorf("%+v: a limiter; want none", l)
		}
	}
	var b *budget
	if !b.allow(1) {
		t.Errorf("no budget refused a line")
	}
}

func TestThousands(t *testing.T) {
	for n, want := range map[int]string{0: "0", 999: "999", 1000: "1,000", 48113: "48,113", 1234567: "1,234,567", -1000: "-1,000"} {
		if got := thousands(n); got != want {
			t.Errorf("thousands(%d) = %q, want %q", n, got, want)
		}
	}
}
