package dispatcher

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/testsync"
	"golang.org/x/sys/unix"
)

// testApp is an app whose workers are helperWorker, with fast restarts.
func testApp(t testing.TB, workers int, env map[string]string) *appfile.App {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	app := appfile.New("t")
	app.Command = []string{self}
	app.Workers = appfile.Workers{N: workers}
	app.Environment["COHORT_TEST_HELPER"] = "worker"
	for k, v := range env {
		app.Environment[k] = v
	}
	app.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
	app.Restart = appfile.Restart{Initial: 10 * time.Millisecond, Max: 100 * time.Millisecond, MinUptime: time.Second}
	app.StopTimeout = 10 * time.Second
	app.ReadyTimeout = 20 * time.Second
	return app
}

// tcpListener binds 127.0.0.1:0 and returns it as a blocking *os.File
// named name, with its address; the file is closed at cleanup.
func tcpListener(t testing.TB, name string) (*os.File, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := l.(*net.TCPListener).File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	nf := os.NewFile(uintptr(fd), name)
	t.Cleanup(func() { nf.Close() })
	return nf, l.Addr().String()
}

// recorder collects a Run's events and notify messages.
type recorder struct {
	mu      sync.Mutex
	events  []Event
	notify  []string
	changed chan struct{}
	pids    map[int]bool
}

func newRecorder() *recorder {
	return &recorder{changed: make(chan struct{}, 1), pids: map[int]bool{}}
}

func (r *recorder) observe(e Event) {
	r.mu.Lock()
	r.events = append(r.events, e)
	if e.Kind == WorkerStarted {
		r.pids[e.PID] = true
	}
	r.mu.Unlock()
	r.poke()
}

func (r *recorder) sdNotify(s string) {
	r.mu.Lock()
	r.notify = append(r.notify, s)
	r.mu.Unlock()
	r.poke()
}

func (r *recorder) poke() {
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

// wait returns the first event from index *from on that matches, moving
// *from past it; it fails the test at the deadline.
func (r *recorder) wait(t testing.TB, from *int, timeout time.Duration, what string, match func(Event) bool) Event {
	t.Helper()
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		for i := *from; i < len(r.events); i++ {
			if match(r.events[i]) {
				*from = i + 1
				e := r.events[i]
				r.mu.Unlock()
				return e
			}
		}
		r.mu.Unlock()
		select {
		case <-r.changed:
		case <-deadline:
			t.Fatalf("no %s within %s", what, timeout)
		}
	}
}

// waitNotify waits for a notify message containing sub.
func (r *recorder) waitNotify(t testing.TB, timeout time.Duration, sub string) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		for _, s := range r.notify {
			if strings.Contains(s, sub) {
				r.mu.Unlock()
				return s
			}
		}
		r.mu.Unlock()
		select {
		case <-r.changed:
		case <-deadline:
			r.mu.Lock()
			defer r.mu.Unlock()
			t.Fatalf("no notify message with %q within %s; got %q", sub, timeout, r.notify)
		}
	}
}

func (r *recorder) workerPIDs() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	var pids []int
	for p := range r.pids {
		pids = append(pids, p)
	}
	return pids
}

func (r *recorder) count(kind EventKind) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, e := range r.events {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

// startRun runs the dispatcher in-process. At cleanup it stops it, waits
// for Run to return and SIGKILLs any worker pid still alive, so a failed
// test leaves nothing behind.
func startRun(t testing.TB, opt Options) (*recorder, func() error) {
	t.Helper()
	rec := newRecorder()
	opt.Observe = rec.observe
	opt.Notify = rec.sdNotify
	logs := &testsync.Buffer{}
	if opt.Stdout == nil {
		opt.Stdout = logs
	}
	if opt.Stderr == nil {
		opt.Stderr = logs
	} else if b, ok := opt.Stderr.(*testsync.Buffer); ok {
		logs = b // a test's own log buffer is what a failure should show
	}
	if opt.RuntimeDir == "" {
		opt.RuntimeDir = t.TempDir()
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, opt) }()
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(30 * time.Second):
				runErr = fmt.Errorf("Run did not return within 30s")
			}
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
		for _, pid := range rec.workerPIDs() {
			if alive(pid) {
				t.Errorf("worker pid %d still alive after Run returned", pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if t.Failed() {
			t.Logf("dispatcher output:\n%s", logs.String())
		}
	})
	return rec, stop
}

// procState returns the state letter of /proc/pid/stat ("" when gone)
// and the parent pid.
func procState(pid int) (string, int) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return "", 0
	}
	f := strings.Fields(s[i+2:])
	ppid, _ := strconv.Atoi(f[1])
	return f[0], ppid
}

// procReport describes pid for a failure message: the lines of
// /proc/PID/status that tell a process that never got a signal (SigPnd,
// ShdPnd without bit 9, SIGKILL) from one slow to act on it (State D,
// wchan), and its kernel stack where readable.
func procReport(pid int) string {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return fmt.Sprintf("pid %d: %v", pid, err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "pid %d:", pid)
	for _, l := range strings.Split(string(status), "\n") {
		for _, k := range []string{"Name:", "State:", "PPid:", "Threads:", "SigPnd:", "ShdPnd:", "SigBlk:"} {
			if strings.HasPrefix(l, k) {
				b.WriteString(" " + strings.Join(strings.Fields(l), " ") + ";")
			}
		}
	}
	if w, err := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", pid)); err == nil {
		fmt.Fprintf(&b, " wchan %s;", w)
	}
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stack", pid)); err == nil {
		fmt.Fprintf(&b, " stack:\n%s", st)
	}
	return b.String()
}

// alive reports whether pid runs (a zombie is not alive).
func alive(pid int) bool {
	st, _ := procState(pid)
	return st != "" && st != "Z"
}

// zombieChildren lists zombie processes whose parent is ppid.
func zombieChildren(t testing.TB, ppid int) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var z []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, pp := procState(pid); st == "Z" && pp == ppid {
			z = append(z, pid)
		}
	}
	return z
}

// get fetches url with a fresh connection and returns the body.
func get(url string) (string, error) { return getWithin(url, 5*time.Second) }

// getWithin is get with its own timeout, for a request that is slow by
// design.
func getWithin(url string, timeout time.Duration) (string, error) {
	c := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return string(b), fmt.Errorf("status %s", resp.Status)
	}
	return string(b), err
}

// field returns key=value's value from a helper worker's answer.
func field(body, key string) string {
	for _, f := range strings.Fields(body) {
		if k, v, ok := strings.Cut(f, "="); ok && k == key {
			return v
		}
	}
	return ""
}

// proc is a helper process started with socket activation, as systemd
// would start it: through the trampoline, so LISTEN_PID is its own.
type proc struct {
	cmd   *exec.Cmd
	lines chan string // its stdout and stderr, line by line
	out   *testsync.Buffer
	done  chan struct{} // closed when it was reaped
	err   error         // its exit, once done is closed
}

// startActivated starts argv (helper selected by env) with the listeners
// at fds 3.. . It is SIGKILLed and waited for at cleanup.
func startActivated(t testing.TB, env []string, listeners []*os.File, argv ...string) *proc {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if len(argv) == 0 {
		argv = []string{self}
	}
	names := make([]string, len(listeners))
	for i, f := range listeners {
		names[i] = f.Name()
	}
	args := append([]string{TrampolineArg, "-1", "-1", argv[0]}, argv...)
	cmd := exec.Command(self, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Env = append(cmd.Env, "LISTEN_FDS="+strconv.Itoa(len(listeners)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
	cmd.ExtraFiles = listeners
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	p := &proc{cmd: cmd, lines: make(chan string, 1024), out: &testsync.Buffer{}, done: make(chan struct{})}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		defer close(p.lines)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			fmt.Fprintln(p.out, sc.Text())
			select {
			case p.lines <- sc.Text():
			default:
			}
		}
	}()
	go func() {
		err := cmd.Wait()
		<-readDone
		pr.Close()
		p.err = err
		close(p.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Errorf("pid %d not reaped", cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("output of pid %d:\n%s", cmd.Process.Pid, p.out.String())
		}
	})
	return p
}

// startDispatcherProc runs a dispatcher for app in its own process.
func startDispatcherProc(t testing.TB, app *appfile.App, listeners []*os.File) *proc {
	t.Helper()
	js, err := json.Marshal(app)
	if err != nil {
		t.Fatal(err)
	}
	return startActivated(t, []string{"COHORT_TEST_HELPER=dispatcher", "COHORT_TEST_APP=" + string(js)}, listeners)
}

// waitLine waits for an output line containing sub.
func (p *proc) waitLine(t testing.TB, timeout time.Duration, sub string) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("process ended before printing %q", sub)
			}
			if strings.Contains(l, sub) {
				return l
			}
		case <-deadline:
			t.Fatalf("no line with %q within %s", sub, timeout)
		}
	}
}

// childrenOf lists the pids whose parent is ppid.
func childrenOf(ppid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, pp := procState(pid); st != "" && pp == ppid {
			out = append(out, pid)
		}
	}
	return out
}

func repoRoot(t testing.TB) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Dir(wd)
}
