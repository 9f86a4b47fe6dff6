package dispatcher

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/cpuset"
	"github.com/cohort-dev/cohort/internal/testproc"
	"github.com/cohort-dev/cohort/internal/testsync"
	"golang.org/x/sys/unix"
)

// TestSharedWorkersAnswer: N workers start, each answers with its index,
// sees LISTEN_PID = its own pid and none of the dispatcher's private
// variables, and systemd hears READY=1 and a readable STATUS=.
func TestSharedWorkersAnswer(t *testing.T) {
	t.Parallel()
	const n = 3
	app := testApp(t, n, map[string]string{"HELPER_READY": "1"})
	app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
	l, addr := tcpListener(t, "http")
	env := append(os.Environ(), "NOTIFY_SOCKET=/dispatcher/own", "WATCHDOG_USEC=5000000", "LISTEN_FDS=7", "JOURNAL_STREAM=1:2")
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}, Environ: env})

	rec.waitNotify(t, 20*time.Second, "READY=1")
	status := rec.waitNotify(t, time.Second, "STATUS=3/3 workers ready · gen 1 · shared · 0 restarts")
	if !strings.HasPrefix(status, "READY=1\n") {
		t.Errorf("READY=1 and STATUS= not in one message: %q", status)
	}
	seen := map[string]bool{}
	deadline := time.Now().Add(15 * time.Second)
	for len(seen) < n && time.Now().Before(deadline) {
		body, err := get("http://" + addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		idx := field(body, "worker")
		if !seen[idx] {
			seen[idx] = true
			if got, want := field(body, "listen_pid"), field(body, "pid"); got != want {
				t.Errorf("worker %s: LISTEN_PID=%s, its pid is %s", idx, got, want)
			}
			if got := field(body, "gen"); got != "1" {
				t.Errorf("worker %s: COHORT_GENERATION=%s", idx, got)
			}
			if got := field(body, "notify"); got == "/dispatcher/own" || !strings.HasSuffix(got, ".sock") {
				t.Errorf("worker %s: NOTIFY_SOCKET=%q, want the dispatcher's socket for workers", idx, got)
			}
			if got := field(body, "watchdog_usec"); got != "" {
				t.Errorf("worker %s: WATCHDOG_USEC=%q leaked from the dispatcher", idx, got)
			}
			if got := field(body, "fdnames"); got != "http" {
				t.Errorf("worker %s: LISTEN_FDNAMES=%q", idx, got)
			}
		}
	}
	for i := range n {
		if !seen[strconv.Itoa(i)] {
			t.Errorf("worker %d never answered (seen %v)", i, seen)
		}
	}
}

// TestKillWorkerUnderLoad: a worker killed with SIGKILL while clients
// hammer the port is replaced, and the service keeps answering.
func TestKillWorkerUnderLoad(t *testing.T) {
	t.Parallel()
	app := testApp(t, 2, map[string]string{"HELPER_READY": "1"})
	app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
	l, addr := tcpListener(t, "http")
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}})
	rec.waitNotify(t, 20*time.Second, "READY=1")

	var ok, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			c := &http.Client{Timeout: 5 * time.Second}
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := c.Get("http://" + addr + "/")
				if err != nil {
					failed.Add(1)
					continue
				}
				resp.Body.Close()
				ok.Add(1)
			}
		})
	}
	defer func() { close(stop); wg.Wait() }()
	testsync.WaitFor(t, 30*time.Second, "load running", func() bool { return ok.Load() > 50 })

	from := 0
	victim := rec.wait(t, &from, time.Second, "a ready worker", func(e Event) bool { return e.Kind == WorkerReady })
	syscall.Kill(victim.PID, syscall.SIGKILL)
	ex := rec.wait(t, &from, 30*time.Second, "the exit", func(e Event) bool { return e.Kind == WorkerExited && e.PID == victim.PID })
	if ex.Signal != syscall.SIGKILL || ex.RestartIn <= 0 {
		t.Errorf("exit event %+v, want SIGKILL and a restart", ex)
	}
	repl := rec.wait(t, &from, 30*time.Second, "the replacement ready", func(e Event) bool {
		return e.Kind == WorkerReady && e.Worker == victim.Worker
	})
	if repl.PID == victim.PID {
		t.Fatal("replacement has the victim's pid")
	}
	base := ok.Load()
	testsync.WaitFor(t, 30*time.Second, "more answers after the replacement", func() bool { return ok.Load() > base+100 })
	rec.waitNotify(t, 10*time.Second, "2/2 workers ready · gen 1 · shared · 1 restart")
	t.Logf("answers %d, failed %d (connections cut by the kill)", ok.Load(), failed.Load())
}

// TestBackoffGrows: a worker that keeps failing is restarted after
// delays that double up to max, and its slot is then in a crash loop.
//
// min_uptime is an hour, which no start reaches however loaded the
// machine: every exit is a quick one, so the delays the dispatcher
// decides (WorkerExited.RestartIn) are exactly the doubling series. (With
// a min_uptime of a second, a race-built worker, which starts through
// the trampoline, sometimes takes longer to fail, and each such exit
// rightly resets the series.)
func TestBackoffGrows(t *testing.T) {
	t.Parallel()
	ctrl := filepath.Join(t.TempDir(), "ctrl")
	writeFile(t, ctrl, "exit")
	app := testApp(t, 1, map[string]string{"HELPER_CTRL": ctrl})
	app.Restart = appfile.Restart{Initial: 20 * time.Millisecond, Max: 160 * time.Millisecond, MinUptime: time.Hour}
	l, _ := tcpListener(t, "http")
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}})
	from := 0
	for _, want := range []time.Duration{20, 40, 80, 160, 160} {
		e := rec.wait(t, &from, 30*time.Second, "an exit", func(e Event) bool { return e.Kind == WorkerExited })
		if e.ExitCode != 3 {
			t.Fatalf("exit of pid %d: code %d, want 3", e.PID, e.ExitCode)
		}
		if e.RestartIn != want*time.Millisecond {
			t.Fatalf("exit of pid %d after %s: restart in %s, want %s", e.PID, e.Uptime, e.RestartIn, want*time.Millisecond)
		}
	}
	rec.waitNotify(t, 30*time.Second, "crash loop: worker 0")
}

// TestBackoffResets: a worker that ran min_uptime is restarted after the
// initial delay again, although the delay had grown before it.
//
// It checks the delays the dispatcher decided against the policy applied
// to the uptimes the dispatcher measured: on a loaded machine even a
// crashing worker may take longer than min_uptime (1 s) to start, and
// then a reset is right.
func TestBackoffResets(t *testing.T) {
	t.Parallel()
	ctrl := filepath.Join(t.TempDir(), "ctrl")
	writeFile(t, ctrl, "exit")
	app := testApp(t, 1, map[string]string{"HELPER_CTRL": ctrl})
	r := appfile.Restart{Initial: 20 * time.Millisecond, Max: 160 * time.Millisecond, MinUptime: time.Second}
	app.Restart = r
	l, _ := tcpListener(t, "http")
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}})

	// policy is the expected delay after an exit of the given uptime.
	next := r.Initial
	policy := func(uptime time.Duration) time.Duration {
		if uptime >= r.MinUptime {
			next = r.Initial
		}
		d := next
		next = min(2*next, r.Max)
		return d
	}
	check := func(e Event) {
		t.Helper()
		if e.ExitCode != 3 {
			t.Fatalf("exit of pid %d: code %d, want 3", e.PID, e.ExitCode)
		}
		if want := policy(e.Uptime); e.RestartIn != want {
			t.Fatalf("exit of pid %d after %s: restart in %s, want %s", e.PID, e.Uptime, e.RestartIn, want)
		}
	}
	// One exit at least, however long it took: after it the delay has
	// doubled (a reset to the initial delay doubles too), so the exit of
	// the worker that stays up would get more than the initial delay
	// without a reset.
	from := 0
	check(rec.wait(t, &from, 30*time.Second, "an exit", func(e Event) bool { return e.Kind == WorkerExited }))
	writeFile(t, ctrl, "live")
	var ready Event
	for ready.PID == 0 {
		e := rec.wait(t, &from, 30*time.Second, "a worker that stays up", func(e Event) bool {
			return e.Kind == WorkerReady || e.Kind == WorkerExited
		})
		if e.Kind == WorkerExited { // it read the file before it said "live"
			check(e)
			continue
		}
		ready = e
	}
	grown := next
	started := rec.wait(t, new(int), time.Second, "its start", func(e Event) bool { return e.Kind == WorkerStarted && e.PID == ready.PID })
	// The time under test, not a synchronization: let it run past
	// min_uptime (counted from before its WorkerStarted), then kill it.
	time.Sleep(time.Until(started.Time.Add(r.MinUptime)))
	syscall.Kill(ready.PID, syscall.SIGKILL)
	ex := rec.wait(t, &from, 30*time.Second, "its exit", func(x Event) bool { return x.Kind == WorkerExited && x.PID == ready.PID })
	if ex.Uptime < r.MinUptime {
		t.Fatalf("pid %d up only %s, want at least min_uptime %s", ex.PID, ex.Uptime, r.MinUptime)
	}
	if ex.RestartIn != r.Initial {
		t.Errorf("after %s up: restart in %s, want the initial %s (without a reset: %s)", ex.Uptime, ex.RestartIn, r.Initial, grown)
	}
}

// TestForeignNotifyIgnored: a datagram from a process that is no worker
// is ignored and counted, and the fd it carried is closed.
func TestForeignNotifyIgnored(t *testing.T) {
	t.Parallel()
	app := testApp(t, 1, nil)
	l, addr := tcpListener(t, "http")
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}})
	from := 0
	rec.wait(t, &from, 20*time.Second, "ready", func(e Event) bool { return e.Kind == WorkerReady })
	body, err := get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	path := field(body, "notify")

	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sock)
	if err := unix.Sendmsg(sock, []byte("READY=1\nSTOPPING=1"), unix.UnixRights(p[1]), &unix.SockaddrUnix{Name: path}, 0); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[1])
	e := rec.wait(t, &from, 5*time.Second, "foreign notify", func(e Event) bool { return e.Kind == ForeignNotify })
	if e.PID != os.Getpid() || e.Foreign != 1 {
		t.Errorf("event %+v, want pid %d and count 1", e, os.Getpid())
	}
	// The dispatcher closed its copy of the write end: the read end sees EOF.
	unix.SetNonblock(p[0], false)
	buf := make([]byte, 1)
	if n, err := unix.Read(p[0], buf); n != 0 || err != nil {
		t.Errorf("read from the pipe = %d, %v; want EOF (the passed fd was leaked)", n, err)
	}
	if rec.count(WorkerExited) != 0 {
		t.Error("the foreign STOPPING=1 affected a worker")
	}
}

// TestWorkerWatchdog: a worker that sent WATCHDOG=1 once and then stays
// silent is killed with SIGABRT and restarted.
func TestWorkerWatchdog(t *testing.T) {
	t.Parallel()
	app := testApp(t, 1, map[string]string{"HELPER_READY": "1", "HELPER_WATCHDOG": "1", "GOTRACEBACK": "single"})
	app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
	app.Watchdog = 300 * time.Millisecond
	l, addr := tcpListener(t, "http")
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}})
	from := 0
	first := rec.wait(t, &from, 20*time.Second, "ready", func(e Event) bool { return e.Kind == WorkerReady })
	// The worker may be killed by the watchdog while it answers (a loaded
	// machine can take 300ms for that): ask until some worker answers.
	var body string
	testsync.WaitFor(t, 30*time.Second, "an answer", func() bool {
		var err error
		body, err = get("http://" + addr + "/")
		return err == nil
	})
	if got := field(body, "watchdog_usec"); got != "300000" {
		t.Errorf("worker sees WATCHDOG_USEC=%q, want 300000", got)
	}
	rec.wait(t, &from, 30*time.Second, "watchdog", func(e Event) bool { return e.Kind == WorkerWatchdog && e.PID == first.PID })
	ex := rec.wait(t, &from, 30*time.Second, "exit", func(e Event) bool { return e.Kind == WorkerExited && e.PID == first.PID })
	// Go turns SIGABRT into exit status 2 after a traceback.
	if ex.Signal != syscall.SIGABRT && ex.ExitCode != 2 {
		t.Errorf("exit %+v, want SIGABRT", ex)
	}
	rec.wait(t, &from, 30*time.Second, "replacement", func(e Event) bool { return e.Kind == WorkerReady })
}

// TestReadyTimeout: a notify worker that never says READY=1 is stopped
// at ready_timeout and retried; systemd never hears READY=1.
func TestReadyTimeout(t *testing.T) {
	t.Parallel()
	app := testApp(t, 1, nil)
	app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
	app.ReadyTimeout = 300 * time.Millisecond
	l, _ := tcpListener(t, "http")
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}})
	from := 0
	first := rec.wait(t, &from, 10*time.Second, "start", func(e Event) bool { return e.Kind == WorkerStarted })
	ex := rec.wait(t, &from, 10*time.Second, "exit", func(e Event) bool { return e.Kind == WorkerExited && e.PID == first.PID })
	// Stopped with stop_signal, not SIGKILL: the worker either handled it
	// (exit 0) or, on a loaded machine, had not installed its handler yet
	// when the signal came and died of it.
	if ex.ExitCode != 0 && ex.Signal != syscall.SIGTERM {
		t.Errorf("exit %+v, want a graceful exit 0 or SIGTERM (stop_signal), not a kill", ex)
	}
	rec.wait(t, &from, 10*time.Second, "restart", func(e Event) bool { return e.Kind == WorkerStarted })
	if rec.count(Ready) != 0 {
		t.Error("READY=1 sent with no worker ready")
	}
}

// TestRestartsLeakNothing: after 1,000 worker restarts the dispatcher has
// the fds it started with, and no worker is left a zombie.
func TestRestartsLeakNothing(t *testing.T) {
	// Not parallel: it counts this process's fds and children.
	const restarts = 1000
	before := testproc.OpenFDs(t)
	settle := filepath.Join(t.TempDir(), "settle")
	app := appfile.New("leak")
	// Exits at once (as /bin/true) until the file settle exists.
	app.Command = []string{"/bin/sh", "-c", `[ -e "$1" ] && exec sleep 1000; exit 0`, "sh", settle}
	app.Workers = appfile.Workers{N: 4}
	app.Restart = appfile.Restart{Initial: time.Millisecond, Max: time.Millisecond, MinUptime: time.Hour}
	l, _ := tcpListener(t, "http")
	app.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
	before++ // the listener
	rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{l}})
	from := 0
	rec.wait(t, &from, 10*time.Second, "the first exit", func(e Event) bool { return e.Kind == WorkerExited })
	during := testproc.OpenFDs(t)
	// A restart is a fork and two execs (the trampoline, a race build,
	// then sh): 60-65 s for 1,000 on this VM alone, more than 90 s under
	// CI's parallel load on a slow day (at f9e89f3 as after).
	rec.wait(t, &from, 4*time.Minute, fmt.Sprintf("%d restarts", restarts), func(e Event) bool {
		return e.Kind == WorkerExited && e.Restarts >= restarts
	})
	// While running: the notify socket, /dev/null, and at most two pipes
	// per live worker on top of the baseline. Not at any moment of the
	// restarts: an exited worker's output pipe is closed by its reader
	// once that has read to the end, which on a loaded machine may come
	// after the next few workers have started. So the workers stay up
	// from now on, and the count must come down.
	writeFile(t, settle, "")
	n := 0
	testsync.WaitFor(t, 20*time.Second, fmt.Sprintf("at most %d fds once restarts stop (%d after the first exit)", during+2*4, during), func() bool {
		n = testproc.OpenFDs(t)
		return n <= during+2*4
	})
	t.Logf("after %d restarts: %d fds, %d after the first exit", restarts, n, during)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if n := testproc.OpenFDs(t); n != before {
		t.Errorf("after Run: %d fds, %d before", n, before)
	}
	pids := map[int]bool{}
	for _, p := range rec.workerPIDs() {
		pids[p] = true
	}
	for _, z := range zombieChildren(t, os.Getpid()) {
		if pids[z] {
			t.Errorf("worker pid %d is a zombie", z)
		}
	}
	if len(pids) < restarts {
		t.Errorf("only %d workers started", len(pids))
	}
}

// TestOutputLines: worker output comes out line by line with the
// "app.N | " label, and a last line without a newline is not lost.
func TestOutputLines(t *testing.T) {
	t.Parallel()
	app := appfile.New("out")
	app.Command = []string{"/bin/sh", "-c", `echo "one"; echo "two" >&2; printf 'no newline'`}
	app.Workers = appfile.Workers{N: 1}
	app.Restart = appfile.Restart{Initial: time.Hour, Max: time.Hour, MinUptime: time.Hour}
	stdout, stderr := &testsync.Buffer{}, &testsync.Buffer{}
	rec, stop := startRun(t, Options{App: app, Stdout: stdout, Stderr: stderr})
	from := 0
	rec.wait(t, &from, 10*time.Second, "exit", func(e Event) bool { return e.Kind == WorkerExited })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	want := "out.0 | one\nout.0 | two\nout.0 | no newline\n"
	if got := stdout.String(); got != want {
		t.Errorf("worker output:\n%q\nwant\n%q", got, want)
	}
	if !strings.Contains(stderr.String(), "out.cohort | worker 0 (pid") {
		t.Errorf("dispatcher log lacks the out.cohort label:\n%s", stderr.String())
	}
}

// TestCommandNotFound: Run refuses to start an app whose command does not
// exist, with the name in the error.
func TestCommandNotFound(t *testing.T) {
	t.Parallel()
	app := appfile.New("nf")
	app.Command = []string{"cohort-no-such-command"}
	err := Run(t.Context(), Options{App: app, Stderr: &testsync.Buffer{}})
	if err == nil || !strings.Contains(err.Error(), "cohort-no-such-command") {
		t.Errorf("Run = %v, want a not-found error naming the command", err)
	}
}

// TestCPUAffinity: cpu_affinity pins worker i to the i-th allowed CPU.
func TestCPUAffinity(t *testing.T) {
	t.Parallel()
	cpus, err := cpuset.Allowed()
	if err != nil {
		t.Fatal(err)
	}
	app := appfile.New("aff")
	app.Command = []string{"/bin/sh", "-c", `grep Cpus_allowed_list /proc/self/status; exec sleep 60`}
	app.Workers = appfile.Workers{Auto: true}
	app.CPUAffinity = true
	stdout := &testsync.Buffer{}
	rec, _ := startRun(t, Options{App: app, Stdout: stdout})
	from := 0
	for range cpus {
		rec.wait(t, &from, 10*time.Second, "start", func(e Event) bool { return e.Kind == WorkerStarted })
	}
	testsync.WaitFor(t, 10*time.Second, "every worker's CPU list", func() bool {
		return strings.Count(stdout.String(), "Cpus_allowed_list") == len(cpus)
	})
	for i, c := range cpus {
		if want := fmt.Sprintf("aff.%d | Cpus_allowed_list:\t%d\n", i, c); !strings.Contains(stdout.String(), want) {
			t.Errorf("worker %d not pinned to CPU %d:\n%s", i, c, stdout.String())
		}
	}
}

// TestSystemdProtocol: WATCHDOG=1 reaches systemd at half its interval
// from the loop, a ready delay is honoured, and a stop says STOPPING=1.
func TestSystemdProtocol(t *testing.T) {
	t.Parallel()
	app := appfile.New("sd")
	app.Command = []string{"/bin/sleep", "60"}
	app.Workers = appfile.Workers{N: 2}
	app.Ready = appfile.Readiness{Kind: appfile.ReadyDelay, Delay: 200 * time.Millisecond}
	rec, stop := startRun(t, Options{App: app, Watchdog: 100 * time.Millisecond})
	from := 0
	st := rec.wait(t, &from, 10*time.Second, "start", func(e Event) bool { return e.Kind == WorkerStarted })
	r := rec.wait(t, &from, 10*time.Second, "ready", func(e Event) bool { return e.Kind == WorkerReady && e.PID == st.PID })
	if d := r.Time.Sub(st.Time); d < 200*time.Millisecond {
		t.Errorf("ready after %s, before the 200ms delay", d)
	}
	rec.waitNotify(t, 5*time.Second, "READY=1")
	rec.waitNotify(t, 5*time.Second, "WATCHDOG=1")
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	rec.waitNotify(t, time.Second, "STOPPING=1")
	rec.waitNotify(t, time.Second, "STATUS=stopping")
}
