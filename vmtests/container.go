package vmtests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// ShareDir is where a container sees its host share: a host directory
// bound read-only, through which WriteFile and CopyFile pass files in.
const ShareDir = "/cohort-vmtest"

// Timeouts of the container life cycle.
const (
	bootTimeout     = 90 * time.Second // nspawn start to is-system-running
	poweroffTimeout = 20 * time.Second // SIGTERM to nspawn's exit
	execTimeout     = 2 * time.Minute  // default for one command inside
)

var containerSeq atomic.Int64

// Container is a Debian root booted with systemd as its PID 1 under
// systemd-nspawn, on a throw-away overlay of the cached root. It shares
// the host's network namespace: servers in it are reached on 127.0.0.1.
type Container struct {
	Release  Release
	Name     string        // machine name, also its cgroup's name
	InitPID  int           // host pid of the container's systemd
	BootTime time.Duration // from starting nspawn to is-system-running

	t       testing.TB
	cmd     *exec.Cmd
	exited  chan struct{} // closed when nspawn has exited
	cg      *cgroupSet    // the container's subtree
	execCg  *cgroupSet    // leaf for commands run through nsenter
	share   string        // host side of ShareDir
	console string        // nspawn's output: the container's console (with RunImage, its PID 1's stderr)
	stdout  string        // with RunImage, its PID 1's stdout
	// initComm is the name PID 1 runs as: "systemd" (Boot), or what
	// RunImage started.
	initComm string

	mu      sync.Mutex
	watched []string
	dumped  bool
	files   int
}

// Boot starts a fresh container of release r and waits until its systemd
// reports the system running ("degraded" is accepted; the failed units are
// logged). t.Cleanup powers it off and removes its cgroups whatever
// happens to the test; when the test failed, the cleanup first logs the
// journal's tail and the status of the watched units.
func Boot(t testing.TB, r Release) *Container {
	t.Helper()
	Require(t)
	root := Root(t, r)
	share := t.TempDir() // removed after the container is gone (cleanups run last-in first-out)
	logs := t.TempDir()
	if err := os.Chmod(share, 0o755); err != nil {
		t.Fatalf("boot %s: %v", r.Name, err)
	}
	name := fmt.Sprintf("%s%d-%d-%s", cgroupPrefix, os.Getpid(), containerSeq.Add(1), r.Name)
	c := &Container{
		Release: r, Name: name, t: t,
		exited:   make(chan struct{}),
		share:    share,
		console:  filepath.Join(logs, "console.log"),
		initComm: "systemd",
	}
	cg, err := newCgroupSet(name)
	if err != nil {
		t.Fatalf("boot %s: %v", name, err)
	}
	c.cg = cg
	t.Cleanup(c.cleanup)
	if c.execCg, err = cg.child("host-exec"); err != nil {
		t.Fatalf("boot %s: %v", name, err)
	}

	console, err := os.Create(c.console)
	if err != nil {
		t.Fatalf("boot %s: %v", name, err)
	}
	defer console.Close() // nspawn has its own copy
	c.cmd = cgroupCommand(context.Background(), cg, "systemd-nspawn",
		"--directory="+root,
		"--machine="+name,
		"--boot",
		"--volatile=overlay", // the cached root stays untouched
		"--register=no",      // no machined on the host
		"--keep-unit",        // no systemd on the host; see cgroup.go
		"--console=pipe",     // the console goes to c.console
		"--bind-ro="+share+":"+ShareDir,
		"--quiet",
	)
	c.cmd.Stdout = console
	c.cmd.Stderr = console
	// If the test binary dies without running cleanups (-timeout, ^C),
	// nspawn gets SIGTERM and halts the container; the next run's
	// sweepStaleCgroups removes what is left.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	start := time.Now()
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("boot %s: start nspawn: %v", name, err)
	}
	go func() {
		_ = c.cmd.Wait()
		close(c.exited)
	}()

	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	if err := c.waitInit(ctx); err != nil {
		t.Fatalf("boot %s: %v\nconsole:\n%s", name, err, c.consoleTail(40))
	}
	state, err := c.waitRunning(ctx)
	if err != nil {
		t.Fatalf("boot %s: %v\nconsole:\n%s", name, err, c.consoleTail(40))
	}
	c.BootTime = time.Since(start)
	t.Logf("%s: booted to %q in %v (init pid %d)", name, state, c.BootTime.Round(time.Millisecond), c.InitPID)
	if state == "degraded" {
		t.Logf("%s: failed units:\n%s", name, c.Exec(t, "systemctl", "--failed", "--no-legend").Stdout)
	}
	return c
}

// cgroupCommand returns a command that moves itself into cg in every
// hierarchy and then execs name with args on the host.
func cgroupCommand(ctx context.Context, cg *cgroupSet, name string, args ...string) *exec.Cmd {
	const script = `for f in $COHORT_VMTEST_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done
unset COHORT_VMTEST_CGROUP_PROCS
exec "$@"`
	cmd := exec.CommandContext(ctx, "/bin/sh", append([]string{"-c", script, "sh", name}, args...)...)
	cmd.Env = append(hostEnv(), "COHORT_VMTEST_CGROUP_PROCS="+strings.Join(cg.procsFiles(), " "))
	return cmd
}

// waitInit finds the container's PID 1 among the processes of its cgroup:
// the one whose pid in its own namespace is 1, once it runs c.initComm.
func (c *Container) waitInit(ctx context.Context) error {
	var last error
	err := poll(ctx, func() error {
		select {
		case <-c.exited:
			last = fmt.Errorf("nspawn exited: %v", c.cmd.ProcessState)
			return nil
		default:
		}
		for _, pid := range c.cg.pids() {
			status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
			if err != nil {
				continue
			}
			for _, line := range strings.Split(string(status), "\n") {
				f := strings.Fields(line)
				if len(f) >= 3 && f[0] == "NSpid:" && f[len(f)-1] == "1" {
					comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
					if strings.TrimSpace(string(comm)) != c.initComm {
						last = fmt.Errorf("container pid 1 (%d) is %q, not %s yet", pid, strings.TrimSpace(string(comm)), c.initComm)
						return last
					}
					c.InitPID = pid
					last = nil
					return nil
				}
			}
		}
		last = errors.New("no container pid 1 in the cgroup yet")
		return last
	})
	if last != nil {
		return fmt.Errorf("find container init: %w", last)
	}
	if err != nil {
		return fmt.Errorf("find container init: %w", err)
	}
	return nil
}

// waitRunning waits for `systemctl is-system-running --wait` to report a
// finished boot. Right after PID 1 starts, its private socket may not
// exist yet, so connection failures are retried until ctx is done.
func (c *Container) waitRunning(ctx context.Context) (string, error) {
	var state string
	var last error
	err := poll(ctx, func() error {
		select {
		case <-c.exited:
			last = fmt.Errorf("nspawn exited: %v", c.cmd.ProcessState)
			return nil
		default:
		}
		res, err := c.ExecContext(ctx, "systemctl", "is-system-running", "--wait")
		if err != nil {
			last = err
			return err
		}
		state = strings.TrimSpace(res.Stdout)
		switch state {
		case "running", "degraded":
			last = nil
			return nil
		case "initializing", "starting", "offline", "":
			// "offline": systemd has just been exec'd and has not yet
			// created /run/systemd/system.
			last = fmt.Errorf("system state %q: %s", state, strings.TrimSpace(res.Stderr))
			return last
		}
		last = fmt.Errorf("system state %q: %s", state, strings.TrimSpace(res.Stderr))
		return nil // stopping, maintenance, offline…: no point waiting
	})
	if last != nil {
		return state, fmt.Errorf("wait for boot: %w", last)
	}
	if err != nil {
		return state, fmt.Errorf("wait for boot: %w", err)
	}
	return state, nil
}

// Result is what a command run in the container did.
type Result struct {
	Stdout, Stderr string
	Code           int // exit status; -1 when killed by a signal
}

func (r Result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.Code, tail(r.Stdout, 60), tail(r.Stderr, 60))
}

// ExecContext runs args inside the container (all its namespaces, its
// root, a clean environment) and returns what it did. A non-zero exit is
// not an error: the error is for a command that could not be run or that
// ctx ended; then the command and everything it started are killed.
func (c *Container) ExecContext(ctx context.Context, args ...string) (Result, error) {
	if len(args) == 0 {
		return Result{}, errors.New("exec: no command")
	}
	nsArgs := append([]string{"--target", strconv.Itoa(c.InitPID), "--all", "--"}, args...)
	cmd := cgroupCommand(ctx, c.execCg, "nsenter", nsArgs...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	// nsenter forks the command into the container's pid namespace; the
	// process group reaches both of them.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	res := Result{Stdout: stdout.String(), Stderr: stderr.String()}
	var exit *exec.ExitError
	switch {
	case ctx.Err() != nil:
		return res, fmt.Errorf("exec %q in %s: %w", strings.Join(args, " "), c.Name, ctx.Err())
	case errors.As(err, &exit):
		res.Code = exit.ExitCode()
		if res.Code == 125 && strings.Contains(res.Stderr, "cgroup.procs") {
			return res, fmt.Errorf("exec %q in %s: enter cgroup: %s", strings.Join(args, " "), c.Name, res.Stderr)
		}
		return res, nil
	case err != nil:
		return res, fmt.Errorf("exec %q in %s: %w", strings.Join(args, " "), c.Name, err)
	}
	return res, nil
}

// Exec runs args inside the container with the default timeout (2 min)
// and returns what it did, whatever its exit status. t fails when the
// command could not be run or timed out.
func (c *Container) Exec(t testing.TB, args ...string) Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), execTimeout)
	defer cancel()
	res, err := c.ExecContext(ctx, args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, res)
	}
	return res
}

// Run runs args inside the container and returns its stdout; t fails when
// it exits non-zero.
func (c *Container) Run(t testing.TB, args ...string) string {
	t.Helper()
	res := c.Exec(t, args...)
	if res.Code != 0 {
		t.Fatalf("%s in %s: %s", strings.Join(args, " "), c.Name, res)
	}
	return res.Stdout
}

// Sh runs a shell script inside the container and returns its stdout; t
// fails when it exits non-zero.
func (c *Container) Sh(t testing.TB, script string) string {
	t.Helper()
	return c.Run(t, "/bin/sh", "-ec", script)
}

// WriteFile creates path inside the container (and its parent
// directories) with data and mode, through the host share.
func (c *Container) WriteFile(t testing.TB, path string, data []byte, mode fs.FileMode) {
	t.Helper()
	staged := c.stage(t, data)
	c.Run(t, "install", "-D", "-m", fmt.Sprintf("%04o", mode.Perm()), staged, path)
}

// CopyFile copies the host file src to path inside the container.
func (c *Container) CopyFile(t testing.TB, src, path string, mode fs.FileMode) {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatalf("copy %s into %s: %v", src, c.Name, err)
	}
	c.WriteFile(t, path, data, mode)
}

// Share puts data into the host share under base and returns its path as
// the container sees it (below ShareDir), for commands that read a file
// in place, such as `apt-get install /cohort-vmtest/x.deb`.
func (c *Container) Share(t testing.TB, base string, data []byte) string {
	t.Helper()
	if err := os.WriteFile(filepath.Join(c.share, base), data, 0o644); err != nil {
		t.Fatalf("share %s with %s: %v", base, c.Name, err)
	}
	return ShareDir + "/" + base
}

func (c *Container) stage(t testing.TB, data []byte) string {
	t.Helper()
	c.mu.Lock()
	c.files++
	n := c.files
	c.mu.Unlock()
	return c.Share(t, fmt.Sprintf("file-%d", n), data)
}

// Journal returns `journalctl -b --no-pager` output with extra arguments
// (for example "-u", "web.service", "-o", "cat").
func (c *Container) Journal(t testing.TB, args ...string) string {
	t.Helper()
	return c.Run(t, append([]string{"journalctl", "-b", "--no-pager", "-q"}, args...)...)
}

// WaitJournal polls the journal (journald reads stdout asynchronously)
// until a line contains want, and returns that line; t fails after
// timeout with the journal's tail. args are extra journalctl arguments.
func (c *Container) WaitJournal(t testing.TB, timeout time.Duration, want string, args ...string) string {
	t.Helper()
	line, err := c.FindJournal(t, timeout, want, args...)
	if err != nil {
		t.Fatal(err)
	}
	return line
}

// FindJournal is WaitJournal returning an error (with the journal's tail)
// instead of failing t, for checks that should not stop the test.
func (c *Container) FindJournal(t testing.TB, timeout time.Duration, want string, args ...string) (string, error) {
	t.Helper()
	var line, last string
	err := EventuallyErr(timeout, func() error {
		last = c.Journal(t, args...)
		for _, l := range strings.Split(last, "\n") {
			if strings.Contains(l, want) {
				line = l
				return nil
			}
		}
		return fmt.Errorf("no journal line contains %q", want)
	})
	if err != nil {
		return "", fmt.Errorf("journalctl -b %s: %w\njournal tail:\n%s", strings.Join(args, " "), err, tail(last, 30))
	}
	return line, nil
}

// Property returns one property of a unit, as `systemctl show -P`.
func (c *Container) Property(t testing.TB, unit, name string) string {
	t.Helper()
	return strings.TrimSpace(c.Run(t, "systemctl", "show", "--property="+name, "--value", unit))
}

// Watch names units under test: when t fails, their `systemctl status` and
// the journal's tail are logged (once per container) before the container
// is powered off.
func (c *Container) Watch(t testing.TB, units ...string) {
	t.Helper()
	c.mu.Lock()
	c.watched = append(c.watched, units...)
	c.mu.Unlock()
	t.Cleanup(func() {
		if t.Failed() {
			c.diagnose(t)
		}
	})
}

// diagnose logs what helps to see why a test failed: the journal's last
// 80 lines, the status of the watched units and the failed units.
func (c *Container) diagnose(t testing.TB) {
	c.mu.Lock()
	if c.dumped {
		c.mu.Unlock()
		return
	}
	c.dumped = true
	units := append([]string(nil), c.watched...)
	c.mu.Unlock()
	select {
	case <-c.exited:
		t.Logf("%s: container is gone; console:\n%s", c.Name, c.consoleTail(80))
		return
	default:
	}
	if c.InitPID == 0 {
		return
	}
	if c.initComm != "systemd" {
		t.Logf("%s: PID 1's stdout:\n%s\nits stderr:\n%s", c.Name, tail(readString(c.stdout), 80), c.consoleTail(80))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	show := func(what string, args ...string) {
		res, err := c.ExecContext(ctx, args...)
		if err != nil {
			t.Logf("%s: %s: %v", c.Name, what, err)
			return
		}
		t.Logf("%s: %s:\n%s%s", c.Name, what, res.Stdout, res.Stderr)
	}
	show("journal (last 80 lines)", "sh", "-c", "journalctl -b --no-pager | tail -n 80")
	if len(units) > 0 {
		show("status of "+strings.Join(units, " "), append([]string{"systemctl", "status", "--no-pager", "--full", "--lines=20"}, units...)...)
	}
	show("failed units", "systemctl", "--failed", "--no-legend")
}

func (c *Container) consoleTail(n int) string {
	return tail(readString(c.console), n)
}

// readString is the content of the file path, "" when it cannot be read.
func readString(path string) string {
	if path == "" {
		return ""
	}
	b, _ := os.ReadFile(path)
	return string(b)
}

// cleanup diagnoses a failed test, powers the container off (SIGTERM to
// nspawn, which halts it), kills whatever is left, and removes its
// cgroups. It runs from t.Cleanup, also after a panic or t.FailNow.
func (c *Container) cleanup() {
	t := c.t
	if t.Failed() {
		c.diagnose(t)
	}
	if c.cmd != nil && c.cmd.Process != nil {
		c.poweroff(t)
	}
	if err := c.cg.remove(context.Background()); err != nil {
		t.Errorf("%s: %v", c.Name, err)
	}
}

// poweroff sends nspawn SIGTERM, which halts the container cleanly; then,
// if it is still there after poweroffTimeout, a second SIGTERM (nspawn's
// "immediate termination"), and last SIGKILL to nspawn and everything in
// the container's cgroups. Only that last step fails t.
func (c *Container) poweroff(t testing.TB) {
	start := time.Now()
	wait := func(d time.Duration) bool {
		select {
		case <-c.exited:
			return true
		case <-time.After(d):
			return false
		}
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	if wait(poweroffTimeout) {
		t.Logf("%s: powered off in %v", c.Name, time.Since(start).Round(time.Millisecond))
		return
	}
	t.Logf("%s: still running %v after SIGTERM; sending nspawn SIGTERM again\nprocesses: %s\nconsole:\n%s",
		c.Name, poweroffTimeout, c.processes(), c.consoleTail(20))
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	if wait(5 * time.Second) {
		return
	}
	t.Errorf("%s: nspawn ignored two SIGTERMs; killing the container", c.Name)
	_ = c.cmd.Process.Kill()
	c.cg.kill()
	if !wait(10 * time.Second) {
		t.Errorf("%s: nspawn (pid %d) survived SIGKILL", c.Name, c.cmd.Process.Pid)
	}
}

// processes describes the processes in the container's cgroups (pid,
// state, name), to see what a container that does not stop is doing.
func (c *Container) processes() string {
	var out []string
	for _, pid := range c.cg.pids() {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// pid (comm) state …; comm may contain spaces and parentheses.
		s := string(stat)
		i, j := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if i < 0 || j < i || j+3 > len(s) {
			continue
		}
		out = append(out, fmt.Sprintf("%d %s %c", pid, s[i+1:j], s[j+2]))
	}
	return strings.Join(out, "; ")
}
