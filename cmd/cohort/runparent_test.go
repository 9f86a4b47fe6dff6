package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testproc"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// TestMain lets this test binary be the cohort binary (main) for the
// tests below, which need real processes: a `cohort run` to kill -9, a
// stdout that is a pipe.
func TestMain(m *testing.M) {
	if os.Getenv("COHORT_TEST_MAIN") == "1" {
		// Its `cohort run` keeps its runtime directory where the test
		// says, not in /run/cohort.
		os.Exit(processMain(&environment{stdout: os.Stdout, stderr: os.Stderr, ownsChildren: true, runtimeRoot: os.Getenv("COHORT_TEST_RUNTIME_ROOT")}))
	}
	os.Exit(m.Run())
}

// cohortProc is `cohort run ARGS…` as its own process.
type cohortProc struct {
	cmd    *exec.Cmd
	stderr *testsync.Buffer
	done   chan struct{} // closed when reaped
	mark   string
}

// startCohortProc starts this binary as `cohort run ARGS…` with stdout
// going to stdout (nil: discarded). At cleanup it and every process
// with its mark in the environment are SIGKILLed.
func startCohortProc(t *testing.T, stdout *os.File, args ...string) *cohortProc {
	t.Helper()
	return startCohortProcVia(t, stdout, nil, args...)
}

// startCohortProcVia is startCohortProc through a trampoline: via is
// the argv that execs the rest (nil: none).
func startCohortProcVia(t *testing.T, stdout *os.File, via []string, args ...string) *cohortProc {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	mark := t.TempDir()
	argv := append(append(append([]string{}, via...), self, "run"), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "COHORT_TEST_MAIN=1", "COHORT_TEST_MARK="+mark, "COHORT_TEST_RUNTIME_ROOT="+filepath.Join(t.TempDir(), "cohort"))
	p := &cohortProc{cmd: cmd, stderr: &testsync.Buffer{}, done: make(chan struct{}), mark: mark}
	cmd.Stderr = p.stderr
	if stdout != nil {
		cmd.Stdout = stdout
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		testproc.KillMarked("COHORT_TEST_MARK=" + mark)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Errorf("cohort run (pid %d) not reaped", cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("stderr of cohort run:\n%s", p.stderr)
		}
	})
	return p
}

// port waits for "listening on 127.0.0.1:PORT" and returns PORT.
func (p *cohortProc) port(t *testing.T) int {
	t.Helper()
	re := regexp.MustCompile(`listening on 127\.0\.0\.1:(\d+)`)
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if m := re.FindStringSubmatch(p.stderr.String()); m != nil {
			n, _ := strconv.Atoi(m[1])
			return n
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("cohort run not listening:\n%s", p.stderr)
	return 0
}

// listenHolders lists the pids (not this test's) holding a socket that
// listens on 127.0.0.1:port (from /proc/net/tcp and /proc/PID/fd).
func listenHolders(t *testing.T, port int) []int {
	t.Helper()
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := fmt.Sprintf("0100007F:%04X", port)
	inodes := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) > 9 && fs[1] == want && fs[3] == "0A" {
			inodes["socket:["+fs[9]+"]"] = true
		}
	}
	return testproc.Holders(func(l string) bool { return inodes[l] })
}

func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// wrapperWorker is a wrapper-style worker (sh -c 'node …'-like: the
// serving process is the child of the worker, in its process group)
// that also double-forks a setsid daemon; all three hold fd 3.
const wrapperWorker = `(setsid sleep 1000 &); sleep 1000; true`

// TestRunKill9LeavesNothing (issue 14.7): after kill -9 of `cohort run`,
// neither the children of wrapper-style workers nor their setsid daemons
// keep the port. At 57c59ff the workers died (PR_SET_PDEATHSIG) and both
// survived.
func TestRunKill9LeavesNothing(t *testing.T) {
	t.Parallel()
	p := startCohortProc(t, nil, "--listen", "127.0.0.1:0", "--workers", "2", "--ready", "exec", "--", "/bin/sh", "-c", wrapperWorker)
	port := p.port(t)
	// The dispatcher, and 2 × (sh, sleep, daemon).
	waitUntil(t, 20*time.Second, "7 holders of the port", func() bool { return len(listenHolders(t, port)) >= 7 })
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
	waitUntil(t, 15*time.Second, "no holder of the port after kill -9 of cohort run", func() bool {
		return len(listenHolders(t, port)) == 0
	})
}

// TestRunKill9OfDispatcher: kill -9 of the process doing the work (the
// child of the one the user started) leaves nothing either, and `cohort
// run` exits 137.
func TestRunKill9OfDispatcher(t *testing.T) {
	t.Parallel()
	p := startCohortProc(t, nil, "--listen", "127.0.0.1:0", "--workers", "2", "--ready", "exec", "--", "/bin/sh", "-c", wrapperWorker)
	port := p.port(t)
	waitUntil(t, 20*time.Second, "7 holders of the port", func() bool { return len(listenHolders(t, port)) >= 7 })
	child := 0
	for _, pid := range listenHolders(t, port) {
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.Contains(string(b), "--listen") {
			child = pid
		}
	}
	if child == 0 || child == p.cmd.Process.Pid {
		t.Fatalf("no dispatcher child among the holders of the port")
	}
	syscall.Kill(child, syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		t.Fatal("cohort run did not exit after its dispatcher was killed")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 137 {
		t.Errorf("exit code %d, want 137 (SIGKILL)", code)
	}
	if h := listenHolders(t, port); len(h) != 0 {
		t.Errorf("holders of the port after kill -9 of the dispatcher: %v", h)
	}
}

// TestRunStdoutReaderGoes (issue 14.4): `cohort run | head -1`: when the
// reader of stdout goes away, cohort run does not die of SIGPIPE (141);
// it says so, the app keeps running, and a SIGTERM stops it with 0.
func TestRunStdoutReaderGoes(t *testing.T) {
	t.Parallel()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	p := startCohortProc(t, w, "--listen", "127.0.0.1:0", "--workers", "1", "--ready", "exec", "--",
		"/bin/sh", "-c", "while :; do echo tick; sleep 0.02; done")
	w.Close()
	port := p.port(t)
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil || !strings.Contains(line, "tick") {
		t.Fatalf("first line %q, %v", line, err)
	}
	r.Close() // head -1 exits
	waitUntil(t, 10*time.Second, "the broken pipe said", func() bool {
		select {
		case <-p.done:
			t.Fatalf("cohort run exited after its stdout reader went away: %v", p.cmd.ProcessState)
		default:
		}
		return strings.Contains(p.stderr.String(), "writing to stdout failed")
	})
	if h := listenHolders(t, port); len(h) < 2 {
		t.Errorf("holders of the port after the reader went: %v, want the dispatcher and the worker", h)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		t.Fatal("cohort run did not stop on SIGTERM")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0 (%v)", code, p.cmd.ProcessState)
	}
}

// TestRunStopLeavesNothing (issue 14.7): after `cohort run` stops on
// SIGTERM, no setsid daemon of a worker keeps the port (at 57c59ff the
// process group's SIGTERM missed it), and the exit status is 0.
func TestRunStopLeavesNothing(t *testing.T) {
	t.Parallel()
	p := startCohortProc(t, nil, "--listen", "127.0.0.1:0", "--workers", "2", "--ready", "exec", "--", "/bin/sh", "-c", wrapperWorker)
	port := p.port(t)
	waitUntil(t, 20*time.Second, "7 holders of the port", func() bool { return len(listenHolders(t, port)) >= 7 })
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		t.Fatal("cohort run did not stop on SIGTERM")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0 (%v)", code, p.cmd.ProcessState)
	}
	if h := listenHolders(t, port); len(h) != 0 {
		t.Errorf("holders of the port after cohort run stopped: %v", h)
	}
}
