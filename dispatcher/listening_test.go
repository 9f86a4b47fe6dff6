package dispatcher

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/sockets"
	"github.com/cohort-dev/cohort/internal/testsync"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// startReady is startRun with the dispatcher's log (stderr) kept, and
// shown when t fails; it waits up to 90 seconds, for a loaded machine,
// for READY=1.
func startReady(t *testing.T, opt Options) (*recorder, func() error, *testsync.Buffer) {
	t.Helper()
	logs := &testsync.Buffer{}
	opt.Stderr = logs
	rec, stop := startRun(t, opt)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("dispatcher log:\n%s", logs.String())
		}
	})
	rec.waitNotify(t, 90*time.Second, "READY=1")
	return rec, stop, logs
}

// TestListeningReadiness: with the default readiness (ready =
// "listening", ready_settle 1s), real programs that never send READY=1
// become ready only once they wait for connections, each in its own way
// (epoll, poll, select, blocking accept, a child that accepts), and serve.
// The Python ones sleep before they listen, so a readiness that did not
// look (ready = "exec") would be early and the test fails.
func TestListeningReadiness(t *testing.T) {
	t.Parallel()
	script := filepath.Join("dispatcher", "testdata", "ready", "server.py")
	tests := []struct {
		name    string
		command func(t *testing.T) []string
		env     map[string]string
		answer  string
		how     string // in the "accepts (…)" log line
		child   bool   // a child process accepts
	}{
		{name: "node", command: func(t *testing.T) []string {
			return []string{testtool.Need(t, "node"), filepath.Join("examples", "node", "server.js")}
		}, answer: "hello from node worker ", how: "epoll"},
		{name: "python-blocking", command: func(t *testing.T) []string {
			return []string{testtool.Python(t), script, "blocking"}
		}, env: map[string]string{"START_DELAY": "0.7"}, answer: "hello from python worker ", how: "accept"},
		{name: "python-select", command: func(t *testing.T) []string {
			return []string{testtool.Python(t), script, "select"}
		}, env: map[string]string{"START_DELAY": "0.7"}, answer: "hello from python worker ", how: "select"},
		{name: "python-poll", command: func(t *testing.T) []string {
			return []string{testtool.Python(t), script, "poll"}
		}, env: map[string]string{"START_DELAY": "0.7"}, answer: "hello from python worker ", how: "poll"},
		{name: "python-asyncio", command: func(t *testing.T) []string {
			return []string{testtool.Python(t), script, "asyncio"}
		}, env: map[string]string{"START_DELAY": "0.7"}, answer: "hello from python worker ", how: "epoll"},
		{name: "go-net-http", command: func(t *testing.T) []string {
			self, err := os.Executable()
			if err != nil {
				t.Fatal(err)
			}
			return []string{self}
		}, env: map[string]string{"COHORT_TEST_HELPER": "worker"}, answer: "worker=", how: "epoll"},
		{name: "go-hello", command: func(t *testing.T) []string {
			return []string{helloBinary(t)} // cohort's library: its READY=1 does not count here
		}, answer: "hello from worker ", how: "epoll"},
		{name: "gunicorn", command: func(t *testing.T) []string {
			return []string{testtool.NeedPython(t, "gunicorn"), "-m", "gunicorn", "--workers", "2",
				"--chdir", filepath.Join(repoRoot(t), "dispatcher", "testdata", "ready"), "wsgi:app"}
		}, answer: "hello from gunicorn worker ", how: "", child: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			app := appfile.New("ex")
			app.Command = tt.command(t)
			app.Workers = appfile.Workers{N: 2}
			app.WorkingDirectory = repoRoot(t)
			app.Environment = tt.env
			app.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
			app.StopTimeout = 10 * time.Second
			app.ReadyTimeout = 90 * time.Second // a loaded machine starts programs slowly
			if app.Ready.Kind != appfile.ReadyListening || app.ReadySettle != time.Second {
				t.Fatalf("default readiness %+v, settle %v; want listening, 1s", app.Ready, app.ReadySettle)
			}
			l, addr := tcpListener(t, "http")
			rec, stop, logs := startReady(t, Options{App: app, Listeners: []*os.File{l}})
			minWait := app.ReadySettle
			if d, ok := tt.env["START_DELAY"]; ok {
				delay, err := time.ParseDuration(d + "s")
				if err != nil {
					t.Fatal(err)
				}
				minWait += delay
			}
			started := map[int]time.Time{}
			rec.mu.Lock()
			for _, e := range rec.events {
				switch e.Kind {
				case WorkerStarted:
					started[e.PID] = e.Time
				case WorkerReady:
					if took := e.Time.Sub(started[e.PID]); took < minWait {
						t.Errorf("worker %d (pid %d) ready after %s, before it could accept and settle (%s)", e.Worker, e.PID, took, minWait)
					}
				}
			}
			rec.mu.Unlock()
			n := 0
			for _, line := range strings.Split(logs.String(), "\n") {
				if strings.Contains(line, ") accepts (") && strings.Contains(line, tt.how) {
					t.Log(strings.TrimSpace(line))
					n++
				}
			}
			if n != 2 {
				t.Errorf("%d log lines \"accepts (…%s…\", want one per worker", n, tt.how)
			}
			if tt.child && !strings.Contains(logs.String(), "in its child pid") {
				t.Errorf("no worker was found accepting in a child process")
			}
			for range 4 {
				body, err := get("http://" + addr + "/")
				if err != nil || !strings.HasPrefix(body, tt.answer) {
					t.Fatalf("answer %q, %v; want %q…", body, err, tt.answer)
				}
			}
			if err := stop(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestListeningRoundRobin: in round-robin mode ready = "listening" watches
// the worker's end of its round-robin channel: cohort's Go library (the
// channel in Go's epoll set) and examples/python/rr_worker.py (recvmsg)
// both become ready, without READY=1 counting, and serve.
func TestListeningRoundRobin(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name    string
		command func(t *testing.T) []string
	}{
		{"go", nil},
		{"python", func(t *testing.T) []string {
			return []string{testtool.Python(t), filepath.Join(repoRoot(t), "examples", "python", "rr_worker.py")}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			app := rrApp(t, 2)
			app.Ready = appfile.Readiness{Kind: appfile.ReadyListening}
			app.ReadyTimeout = 90 * time.Second
			if tt.command != nil {
				app.Command = tt.command(t)
			}
			l, addr := tcpListener(t, "http")
			_, stop, logs := startReady(t, Options{App: app, Listeners: []*os.File{l}})
			if n := strings.Count(logs.String(), ") accepts ("); n != 2 {
				t.Errorf("%d \"accepts\" log lines, want one per worker", n)
			}
			for _, line := range strings.Split(logs.String(), "\n") {
				if strings.Contains(line, ") accepts (") {
					t.Log(strings.TrimSpace(line))
				}
			}
			if counts := spread(t, addr, 20, 4); len(counts) != 2 {
				t.Errorf("answers per worker %v, want both", counts)
			}
			if err := stop(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestListeningReusePort: in reuseport mode each worker is watched for its
// own slot's socket, so a worker counts as ready by accepting on the
// socket it was given (Python's blocking accept here), and every slot
// serves.
func TestListeningReusePort(t *testing.T) {
	t.Parallel()
	app := appfile.New("rp")
	app.Command = []string{testtool.Python(t), filepath.Join("dispatcher", "testdata", "ready", "server.py"), "blocking"}
	app.WorkingDirectory = repoRoot(t)
	app.Mode = appfile.ModeReusePort
	app.Workers = appfile.Workers{N: 2}
	app.ReadyTimeout = 90 * time.Second
	app.StopTimeout = 10 * time.Second
	app.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP, ReusePort: true}}
	slots, err := sockets.BindSlots(app, 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, set := range slots {
			for _, f := range set {
				f.Close()
			}
		}
	})
	_, stop, logs := startReady(t, Options{App: app, SlotListeners: slots})
	if n := strings.Count(logs.String(), ") accepts (accept4 on fd 3"); n != 2 {
		t.Errorf("%d \"accepts (accept4 on fd 3\" log lines, want one per worker", n)
	}
	addr := sockets.BoundAddr(slots[0][0])
	seen := map[string]bool{}
	for i := 0; i < 200 && len(seen) < 2; i++ {
		body, err := get("http://" + addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		seen[strings.Fields(strings.TrimPrefix(body, "hello from python worker "))[0]] = true
	}
	if len(seen) != 2 {
		t.Errorf("workers %v answered, want both", seen)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}
