package dispatcher

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testsync"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// The trust contract "a reload is truthful by default" (issue 13), with
// app files that leave ready out, as a new user writes them. These tests
// use nothing but app files and the control socket, so that they run
// unchanged on the commit before ready = "listening" existed, where they
// fail.

// truthApp is an app file without a ready key.
func truthApp(command []string, addr string, env map[string]string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "command = [")
	for i, c := range command {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%q", c)
	}
	// ready_timeout: a loaded machine starts programs slowly.
	fmt.Fprintf(&b, "]\nworkers = 2\nmode = \"shared\"\nstop_timeout = \"10s\"\nready_timeout = \"90s\"\n")
	fmt.Fprintf(&b, "[restart]\ninitial = \"50ms\"\nmax = \"500ms\"\n")
	if len(env) > 0 {
		b.WriteString("[environment]\n")
		for k, v := range env {
			fmt.Fprintf(&b, "%s = %q\n", k, v)
		}
	}
	fmt.Fprintf(&b, "[[listen]]\nname = \"http\"\naddress = %q\n", addr)
	return b.String()
}

// truthFixture runs an app file in-process, with its control socket.
type truthFixture struct {
	file, addr, sock string
	logs             *testsync.Buffer
}

func startTruth(t *testing.T, command []string, env map[string]string) *truthFixture {
	t.Helper()
	l, addr := tcpListener(t, "http")
	f := &truthFixture{file: filepath.Join(t.TempDir(), "web.toml"), addr: addr, logs: &testsync.Buffer{}}
	writeFile(t, f.file, truthApp(command, addr, env))
	app, err := appfile.ParseFile(f.file)
	if err != nil {
		t.Fatal(err)
	}
	app.WorkingDirectory = repoRoot(t)
	rt := t.TempDir()
	f.sock = filepath.Join(rt, control.SocketName)
	// The reloaded file has no working_directory: run the test from the
	// repository root instead, for both generations alike.
	opt := Options{App: app, Listeners: []*os.File{l}, RuntimeDir: rt, Stderr: f.logs,
		Load: func() (*appfile.App, error) {
			a, err := appfile.ParseFile(f.file)
			if err == nil {
				a.WorkingDirectory = app.WorkingDirectory
			}
			return a, err
		}}
	rec, _ := startRun(t, opt)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("dispatcher log:\n%s", f.logs.String())
		}
	})
	rec.waitNotify(t, 90*time.Second, "READY=1")
	// Under a readiness that does not look, READY=1 can come before the
	// workers accept; wait until they answer, so the test starts from a
	// serving app whatever the readiness.
	testsync.WaitFor(t, 30*time.Second, "first answer", func() bool { _, err := get("http://" + addr + "/"); return err == nil })
	return f
}

func (f *truthFixture) reload(t *testing.T) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err := control.Call(ctx, f.sock, control.Request{Cmd: control.CmdReload})
	return err
}

func (f *truthFixture) status(t *testing.T) *control.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rep, err := control.Call(ctx, f.sock, control.Request{Cmd: control.CmdStatus})
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	return rep.Status
}

// truthLoad sends requests one after another until stopped, and counts
// the failed ones and the slowest answer.
type truthLoad struct {
	stop    chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	sent    int
	failed  int
	first   error
	slowest time.Duration
}

func startTruthLoad(addr string) *truthLoad {
	l := &truthLoad{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.stop:
				return
			default:
			}
			t0 := time.Now()
			_, err := get("http://" + addr + "/")
			took := time.Since(t0)
			l.mu.Lock()
			l.sent++
			if err != nil {
				l.failed++
				if l.first == nil {
					l.first = err
				}
			}
			l.slowest = max(l.slowest, took)
			l.mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return l
}

func (l *truthLoad) end(t *testing.T) (sent, failed int, slowest time.Duration) {
	close(l.stop)
	select {
	case <-l.done:
	case <-time.After(15 * time.Second):
		t.Fatal("load did not stop")
	}
	if l.failed > 0 {
		t.Errorf("%d of %d requests failed, first: %v", l.failed, l.sent, l.first)
	}
	return l.sent, l.failed, l.slowest
}

// checkOldServe checks that the workers before a failed reload still
// serve: same pids, generation 1, all ready.
func checkOldServe(t *testing.T, f *truthFixture, before *control.Status) {
	t.Helper()
	after := f.status(t)
	if after.Generation != 1 || len(after.Workers) != len(before.Workers) {
		t.Fatalf("after the failed reload: generation %d, %d workers; want generation 1, %d", after.Generation, len(after.Workers), len(before.Workers))
	}
	for i, w := range after.Workers {
		if w.PID != before.Workers[i].PID || w.State != "ready" {
			t.Errorf("worker %d after the failed reload: pid %d %s; want the old pid %d, ready", i, w.PID, w.State, before.Workers[i].PID)
		}
	}
	for range 5 {
		if body, err := get("http://" + f.addr + "/"); err != nil || !strings.Contains(body, "gen 1") {
			t.Fatalf("after the failed reload: %q, %v; want an answer from generation 1", body, err)
		}
	}
}

// TestReloadTruthfulNodeSyntaxError is the broken deploy of issue 13:
// a Node app with the default readiness, `echo "const x = ;" >> server.js`,
// reload. The reload must fail, the old workers keep serving, and no
// request fails; after the fix a reload succeeds.
func TestReloadTruthfulNodeSyntaxError(t *testing.T) {
	t.Parallel()
	node := testtool.System(t, "node")
	src, err := os.ReadFile(filepath.Join(repoRoot(t), "examples", "node", "server.js"))
	if err != nil {
		t.Fatal(err)
	}
	js := filepath.Join(t.TempDir(), "server.js")
	writeFile(t, js, string(src))
	f := startTruth(t, []string{node, js}, nil)
	before := f.status(t)
	load := startTruthLoad(f.addr)

	writeFile(t, js, string(src)+"\nconst x = ;\n")
	if err := f.reload(t); err == nil {
		t.Errorf("reload onto a server.js with a syntax error succeeded; want it to fail")
	} else {
		t.Logf("reload failed as it should: %v", err)
	}
	checkOldServe(t, f, before)

	writeFile(t, js, string(src))
	if err := f.reload(t); err != nil {
		t.Fatalf("reload onto the fixed server.js: %v", err)
	}
	sent, failed, slowest := load.end(t)
	t.Logf("%d/%d requests failed, slowest %s", failed, sent, slowest)
	if st := f.status(t); st.Generation != 2 {
		t.Errorf("generation %d after the good reload, want 2 (a failed reload keeps generation 1)", st.Generation)
	}
}

// TestReloadTruthfulEarlyCrash: new code that listens and then crashes
// within its first second fails the reload (the settle window).
func TestReloadTruthfulEarlyCrash(t *testing.T) {
	t.Parallel()
	py := testtool.System(t, "python3")
	script := filepath.Join("dispatcher", "testdata", "ready", "server.py")
	cmd := []string{py, script, "poll"}
	f := startTruth(t, cmd, nil)
	before := f.status(t)
	load := startTruthLoad(f.addr)

	writeFile(t, f.file, truthApp(cmd, f.addr, map[string]string{"DIE_AFTER": "0.3"}))
	if err := f.reload(t); err == nil {
		t.Errorf("reload onto workers that die 0.3 s after they listen succeeded; want it to fail")
	} else {
		t.Logf("reload failed as it should: %v", err)
	}
	checkOldServe(t, f, before)
	sent, failed, slowest := load.end(t)
	t.Logf("%d/%d requests failed, slowest %s", failed, sent, slowest)
}

// TestReloadTruthfulSlowStart: new code that needs 3 s before it listens
// replaces the old workers only once it accepts, so requests during the
// reload wait no longer than usual, instead of the 3 s or more that a
// readiness that did not look would add (the old worker stopped, the new
// one not yet accepting). The bound, 2 s, leaves room for a loaded
// machine's hiccups.
func TestReloadTruthfulSlowStart(t *testing.T) {
	t.Parallel()
	py := testtool.System(t, "python3")
	script := filepath.Join("dispatcher", "testdata", "ready", "server.py")
	cmd := []string{py, script, "poll"}
	f := startTruth(t, cmd, nil)
	load := startTruthLoad(f.addr)
	writeFile(t, f.file, truthApp(cmd, f.addr, map[string]string{"START_DELAY": "3"}))
	if err := f.reload(t); err != nil {
		t.Fatalf("reload onto slow-starting workers: %v", err)
	}
	sent, failed, slowest := load.end(t)
	t.Logf("slow-start reload: %d/%d requests failed, slowest %s", failed, sent, slowest)
	if slowest > 2*time.Second {
		t.Errorf("a request waited %s during the reload: an old worker was stopped before its replacement accepted", slowest)
	}
}
