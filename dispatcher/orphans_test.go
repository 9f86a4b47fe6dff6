package dispatcher

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/testproc"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// holders lists the live pids (other than this test's) that hold the
// socket inode, as /proc/PID/fd shows it.
func holders(inode string) []int {
	h := testproc.Holders(func(l string) bool { return l == inode })
	return slices.DeleteFunc(h, func(pid int) bool { return !alive(pid) })
}

// escapingApp is an app whose worker double-forks a setsid daemon that
// keeps fd 3 (the listener), then runs on (or, with crash, exits 1 after
// a moment). The daemon writes its pid to dir/daemon.PID-OF-WORKER; the
// worker creates dir/detached.ITS-PID once the intermediate subshell has
// exited (the worker has waited for it), which is when the daemon has
// been reparented: the daemon's own file may come first.
func escapingApp(t *testing.T, dir string, crash bool) *appfile.App {
	t.Helper()
	if _, err := exec.LookPath("setsid"); err != nil {
		t.Fatal("setsid(1) not found (util-linux)")
	}
	tail := "exec sleep 1000"
	if crash {
		tail = "sleep 0.2; exit 1"
	}
	script := fmt.Sprintf(`(setsid sh -c 'echo $$ > %s/daemon.$PPID_W; exec sleep 1000' &) ; : > %s/detached.$$; %s`, dir, dir, tail)
	app := appfile.New("esc")
	app.Command = []string{"/bin/sh", "-c", "PPID_W=$$; export PPID_W; " + script}
	app.Environment["ESC_TEST_DIR"] = dir
	app.Workers = appfile.Workers{N: 1}
	app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
	app.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
	app.Restart = appfile.Restart{Initial: 10 * time.Millisecond, Max: 100 * time.Millisecond, MinUptime: time.Minute}
	app.StopTimeout = 5 * time.Second
	return app
}

// daemons returns the pids the daemons wrote so far.
func daemons(dir string) []int {
	files, _ := filepath.Glob(filepath.Join(dir, "daemon.*"))
	var pids []int
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// detached reports whether the worker pid's intermediate subshell has
// exited, so that its daemon's parent is no longer that subshell.
func detached(dir string, pid int) bool {
	_, err := os.Stat(filepath.Join(dir, fmt.Sprintf("detached.%d", pid)))
	return err == nil
}

// daemonWorkers returns the pids of the workers whose daemons wrote
// their pids so far.
func daemonWorkers(dir string) []int {
	files, _ := filepath.Glob(filepath.Join(dir, "daemon.*"))
	var pids []int
	for _, f := range files {
		if pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(f), "daemon.")); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// daemonOf returns the pid of the worker pid's daemon, 0 while it has not
// written it.
func daemonOf(dir string, pid int) int {
	b, _ := os.ReadFile(filepath.Join(dir, fmt.Sprintf("daemon.%d", pid)))
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// TestEscapedDaemonKilled (issue 14.7): a worker that double-forks a
// setsid daemon holding the listener: the daemon lives while its worker
// does, is killed when the worker is (and its slot restarts), and after
// the dispatcher stops no process holds the listener. At 57c59ff the
// daemon kept serving after both.
func TestEscapedDaemonKilled(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	app := escapingApp(t, dir, false)
	l, _ := tcpListener(t, "http")
	inode := socketInode(t, l)
	d := startDispatcherProc(t, app, []*os.File{l})
	t.Cleanup(func() { testproc.KillMarked("ESC_TEST_DIR=" + dir) })
	d.waitLine(t, 20*time.Second, "all 1 workers ready")
	// The daemon is reparented when the intermediate subshell exits,
	// which may be after the daemon wrote its pid.
	worker := 0
	testsync.WaitFor(t, 10*time.Second, "the first daemon, detached", func() bool {
		w := daemonWorkers(dir)
		if len(w) == 1 && daemonOf(dir, w[0]) > 0 && detached(dir, w[0]) {
			worker = w[0]
		}
		return worker != 0
	})
	first := daemonOf(dir, worker)
	if !slices.Contains(childrenOf(d.cmd.Process.Pid), worker) {
		t.Fatalf("worker %d (whose daemon is %d) is no child of the dispatcher", worker, first)
	}
	if pp := ppidOf(first); pp != d.cmd.Process.Pid {
		t.Errorf("daemon %d has parent %d, want the dispatcher %d (a subreaper)", first, pp, d.cmd.Process.Pid)
	}
	if h := holders(inode); !slices.Contains(h, first) || !alive(first) {
		t.Fatalf("holders of the listener %v: the daemon %d should hold it while its worker %d runs", h, first, worker)
	}

	syscall.Kill(worker, syscall.SIGKILL)
	testsync.WaitFor(t, 10*time.Second, "the second daemon", func() bool { return len(daemons(dir)) == 2 })
	second := slices.DeleteFunc(daemonWorkers(dir), func(p int) bool { return p == worker })[0]
	// Until its subshell has exited, that holds the listener too.
	testsync.WaitFor(t, 10*time.Second, "the second daemon detached", func() bool { return detached(dir, second) })
	testsync.WaitFor(t, 5*time.Second, "the first daemon gone", func() bool { return !alive(first) })
	h := holders(inode)
	if len(h) != 3 { // the dispatcher, the new worker, its daemon
		t.Errorf("holders of the listener after the restart: %v, want 3 (the dispatcher, worker %d, daemon %d)", h, second, daemonOf(dir, second))
	}

	stopLeavesNoHolder(t, d, inode)
}

// TestCrashLoopLeavesNoDaemon: a crash-looping worker that leaves a
// daemon at each start leaves none running (at 57c59ff one per crash).
func TestCrashLoopLeavesNoDaemon(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	app := escapingApp(t, dir, true)
	l, _ := tcpListener(t, "http")
	inode := socketInode(t, l)
	d := startDispatcherProc(t, app, []*os.File{l})
	t.Cleanup(func() { testproc.KillMarked("ESC_TEST_DIR=" + dir) })
	testsync.WaitFor(t, 20*time.Second, "5 crashes", func() bool { return len(daemons(dir)) >= 5 })
	// Every daemon but the current worker's is gone.
	testsync.WaitFor(t, 5*time.Second, "at most one daemon alive", func() bool {
		n := 0
		for _, pid := range daemons(dir) {
			if alive(pid) {
				n++
			}
		}
		return n <= 1
	})
	// The dispatcher, the worker, its "sleep 0.2", its daemon.
	if h := holders(inode); len(h) > 4 {
		t.Errorf("holders of the listener in the crash loop: %v, want at most 4", h)
	}
	stopLeavesNoHolder(t, d, inode)
}

// stopLeavesNoHolder stops the dispatcher d with SIGTERM and waits until
// it has ended and no process holds the listener inode any more.
func stopLeavesNoHolder(t *testing.T, d *proc, inode string) {
	t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(15 * time.Second):
		t.Fatal("dispatcher did not stop")
	}
	testsync.WaitFor(t, 5*time.Second, "no holder of the listener", func() bool { return len(holders(inode)) == 0 })
}

func ppidOf(pid int) int {
	_, pp := procState(pid)
	return pp
}
