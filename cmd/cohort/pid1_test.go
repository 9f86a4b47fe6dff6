package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testcgroup"
	"github.com/cohort-dev/cohort/internal/testproc"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// The tests here run `cohort run` as PID 1 of a pid namespace of its
// own (unshare --pid --fork --mount-proc: what a container runtime
// does, minus the image), where the kernel hands it every orphan of the
// namespace and drops signals it has no handler for. vmtests/container_test.go
// (TestContainer) does the same under systemd-nspawn in a Debian root.

// pid1Via is the argv prefix that makes what follows PID 1 of a new pid
// namespace; unshare's own child, PID 1, is killed with it.
func pid1Via(t *testing.T) []string {
	t.Helper()
	if os.Geteuid() != 0 {
		testtool.Missing(t, "a pid namespace needs root")
	}
	return []string{testtool.Need(t, "unshare"), "--pid", "--fork", "--mount-proc", "--kill-child"}
}

// startPID1 starts `cohort run ARGS…` as PID 1 of a new pid namespace,
// through via first (nil: none), and returns it with the host pid of
// that PID 1: cohort run's parent (runParent).
func startPID1(t *testing.T, stdout *os.File, via []string, args ...string) (*cohortProc, int) {
	t.Helper()
	p := startCohortProcVia(t, stdout, append(via, pid1Via(t)...), args...)
	var init int
	waitUntil(t, 10*time.Second, "unshare's child", func() bool {
		kids := testproc.Children(p.cmd.Process.Pid)
		if len(kids) == 1 {
			init = kids[0]
		}
		return init != 0
	})
	if ns := nsPID(init); ns != 1 {
		t.Fatalf("pid %d is pid %d in its namespace, want 1", init, ns)
	}
	return p, init
}

// nsPID is pid's pid in its own (innermost) pid namespace, 0 when gone.
func nsPID(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	m := regexp.MustCompile(`(?m)^NSpid:.*\s(\d+)$`).FindSubmatch(b)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

// zombiesIn lists the zombies in the pid namespace of init (host pids).
func zombiesIn(init int) []int {
	ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", init))
	if err != nil {
		return nil
	}
	var zs []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid)); l != ns {
			continue
		}
		if testproc.State(pid) == "Z" {
			zs = append(zs, pid)
		}
	}
	return zs
}

// waitExit waits for p to exit and returns its exit code (unshare's: its
// PID 1's).
func waitExit(t *testing.T, p *cohortProc, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("cohort run did not exit within %s", timeout)
	}
	return p.cmd.ProcessState.ExitCode()
}

// TestPID1ReapsOrphans: as PID 1, cohort run reaps a double-forked
// process of an exec session (docker exec, kubectl exec: its parent is
// outside the namespace, so its orphan goes to PID 1) once it exits;
// before, it stayed a zombie for the container's life. The workers'
// double-forked processes go to the dispatcher, a subreaper, and are
// reaped there. No zombie is left in the namespace.
func TestPID1ReapsOrphans(t *testing.T) {
	t.Parallel()
	nsenter := testtool.Need(t, "nsenter")
	p, init := startPID1(t, nil, nil, "--listen", "127.0.0.1:0", "--workers", "2", "--ready", "exec", "--name", "pid1",
		"--", "/bin/sh", "-c", `(sleep 0.2 &); exec sleep 1000`)
	p.port(t)
	waitUntil(t, 20*time.Second, "the workers ready", func() bool { return strings.Contains(p.stderr.String(), "all 2 workers ready") })
	dispatcherPID := testproc.Children(init)
	if len(dispatcherPID) != 1 {
		t.Fatalf("PID 1's children %v, want the dispatcher alone", dispatcherPID)
	}

	// An exec session: nsenter's child (in the namespace, its parent
	// outside) starts a process in the background and exits.
	sess := exec.Command(nsenter, "--target", strconv.Itoa(init), "--pid", "--", "/bin/sh", "-c", "sleep 2 </dev/null >/dev/null 2>&1 & exit 0")
	sess.Env = append(os.Environ(), "COHORT_TEST_MARK="+p.mark)
	if out, err := sess.CombinedOutput(); err != nil {
		t.Fatalf("nsenter: %v\n%s", err, out)
	}
	var orphan int
	waitUntil(t, 5*time.Second, "the orphan reparented to PID 1", func() bool {
		for _, pid := range testproc.Children(init) {
			if pid != dispatcherPID[0] {
				orphan = pid
			}
		}
		return orphan != 0
	})
	if nsPID(orphan) < 2 {
		t.Fatalf("orphan %d is not in the namespace", orphan)
	}
	for deadline := time.Now().Add(10 * time.Second); testproc.State(orphan) != ""; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("orphan %d not reaped within 10s: state %q", orphan, testproc.State(orphan))
		}
	}
	time.Sleep(300 * time.Millisecond) // the workers' sleep 0.2 too
	if z := zombiesIn(init); len(z) != 0 {
		t.Errorf("zombies in the namespace: %v", z)
	}
	syscall.Kill(init, syscall.SIGTERM)
	if code := waitExit(t, p, 20*time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
}

// TestPID1Stop: SIGTERM to PID 1 (docker stop, a pod's deletion) reaches
// the workers through the dispatcher, their output is on stdout with
// worker prefixes, and the exit code is 0; nothing keeps the port.
func TestPID1Stop(t *testing.T) {
	t.Parallel()
	outPath := filepath.Join(t.TempDir(), "stdout")
	out, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	p, init := startPID1(t, out, nil, "--listen", "127.0.0.1:0", "--workers", "2", "--ready", "exec", "--name", "pid1",
		"--", "/bin/sh", "-c", `trap 'echo "bye from $COHORT_WORKER"; exit 0' TERM; echo "hello from $COHORT_WORKER"; sleep 1000 & wait`)
	port := p.port(t)
	waitUntil(t, 20*time.Second, "the workers ready", func() bool { return strings.Contains(p.stderr.String(), "all 2 workers ready") })
	waitUntil(t, 10*time.Second, "the workers' first lines", func() bool {
		b, _ := os.ReadFile(outPath)
		return strings.Count(string(b), "hello from") == 2
	})
	syscall.Kill(init, syscall.SIGTERM)
	if code := waitExit(t, p, 20*time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
	b, _ := os.ReadFile(outPath)
	for _, want := range []string{"pid1.0 | hello from 0\n", "pid1.1 | hello from 1\n", "pid1.0 | bye from 0\n", "pid1.1 | bye from 1\n"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("stdout lacks %q:\n%s", want, b)
		}
	}
	if !strings.Contains(p.stderr.String(), "stopping (got terminated)") {
		t.Errorf("no stop line on stderr:\n%s", p.stderr)
	}
	if h := listenHolders(t, port); len(h) != 0 {
		t.Errorf("holders of the port after the stop: %v", h)
	}
}

// TestPID1Failed: the exit codes a container runtime sees when the app
// failed: 1 when no worker became ready within ready_timeout (a command
// that crashes at once), 137 when the dispatcher itself was killed.
func TestPID1Failed(t *testing.T) {
	t.Parallel()
	t.Run("crashing app", func(t *testing.T) {
		t.Parallel()
		file := writeApp(t, t.TempDir(), "crash.toml", `command = ["/bin/sh", "-c", "echo crashing; exit 3"]
workers = 2
ready = "notify"
ready_timeout = "1s"
[[listen]]
name = "http"
address = "127.0.0.1:`+freePort(t)+`"
`)
		p, _ := startPID1(t, nil, nil, file)
		if code := waitExit(t, p, 30*time.Second); code != 1 {
			t.Errorf("exit code %d, want 1", code)
		}
		if !strings.Contains(p.stderr.String(), "cohort run: app crash: no worker ready after ready_timeout (1s)") {
			t.Errorf("stderr:\n%s", p.stderr)
		}
	})
	t.Run("dispatcher killed", func(t *testing.T) {
		t.Parallel()
		p, init := startPID1(t, nil, nil, "--listen", "127.0.0.1:0", "--workers", "1", "--ready", "exec", "--", "/bin/sh", "-c", wrapperWorker)
		port := p.port(t)
		waitUntil(t, 20*time.Second, "the worker ready", func() bool { return strings.Contains(p.stderr.String(), "all 1 workers ready") })
		kids := testproc.Children(init)
		if len(kids) != 1 {
			t.Fatalf("PID 1's children %v, want the dispatcher alone", kids)
		}
		syscall.Kill(kids[0], syscall.SIGKILL)
		if code := waitExit(t, p, 20*time.Second); code != 137 {
			t.Errorf("exit code %d, want 137", code)
		}
		if h := listenHolders(t, port); len(h) != 0 {
			t.Errorf("holders of the port: %v", h)
		}
	})
}

// TestPID1CPUQuota: PID 1 of a pid namespace in a cgroup v1 with a CPU
// quota of 1.5 CPUs on a machine of 2 or more: workers = "auto" is 1.
func TestPID1CPUQuota(t *testing.T) {
	_, self := testcgroup.V1(t, "cpu")
	cpus, _ := os.ReadFile("/proc/self/status")
	if !regexp.MustCompile(`(?m)^Cpus_allowed_list:\s*\d+[-,]`).Match(cpus) {
		testtool.Missing(t, "this test needs 2 CPUs or more")
	}
	dir := testcgroup.New(t, self, [][2]string{{"cpu.cfs_period_us", "100000"}, {"cpu.cfs_quota_us", "150000"}})
	lines, status := runInCgroupVia(t, dir, pid1Via(t))
	if !slices.Equal(lines, []string{"cg.0 | cpus=1"}) {
		t.Errorf("worker lines %q, want one worker with COHORT_CPUS=1", lines)
	}
	if !regexp.MustCompile(`^cg: workers auto = 1 \(affinity \d+, cgroup cpu quota 1\.50\)$`).MatchString(status) {
		t.Errorf("status line %q", status)
	}
}
