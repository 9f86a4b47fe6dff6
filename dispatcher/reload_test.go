package dispatcher

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/sockets"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// appFile is the TOML of an app whose workers are helperWorker (ready =
// notify), listening on addr; a reload re-reads it. helper picks another
// helper ("cohort-worker"); extra is added to the top-level keys.
type appFile struct {
	workers, batch int
	mode           string
	env            map[string]string
	addr           string
	readyTimeout   string
	helper, extra  string
	recycle        string // the [recycle] table's lines
}

func (a appFile) toml(t testing.TB) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if a.mode == "" {
		a.mode = "shared"
	}
	if a.batch == 0 {
		a.batch = 1
	}
	if a.readyTimeout == "" {
		a.readyTimeout = "20s"
	}
	if a.helper == "" {
		a.helper = "worker"
	}
	var env strings.Builder
	keys := make([]string, 0, len(a.env))
	for k := range a.env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&env, "%s = %q\n", k, a.env[k])
	}
	return fmt.Sprintf(`command = [%q]
workers = %d
mode = %q
ready = "notify"
ready_timeout = %q
stop_timeout = "10s"
reload_batch = %d
%s
[environment]
COHORT_TEST_HELPER = %q
HELPER_READY = "1"
%s
[restart]
initial = "10ms"
max = "100ms"
min_uptime = "1s"

[[listen]]
name = "http"
address = %q

[recycle]
%s`, self, a.workers, a.mode, a.readyTimeout, a.batch, a.extra, a.helper, env.String(), a.addr, a.recycle)
}

// reloadFixture is an in-process dispatcher running the app of a file.
type reloadFixture struct {
	file, sock, addr string
	rec              *recorder
	stop             func() error
	logs             *testsync.Buffer
	slots            [][]*os.File // reuseport mode: the sockets of each slot
}

func startFromFile(t testing.TB, a appFile) *reloadFixture {
	t.Helper()
	dir := t.TempDir()
	file := filepath.Join(dir, "t.toml")
	opt := Options{RuntimeDir: t.TempDir(), Stderr: &testsync.Buffer{}}
	if a.mode == string(appfile.ModeReusePort) {
		// Bind first (the port 0 picks is the app's address), as the
		// sockets systemd binds exist before the dispatcher starts.
		app := appfile.New("t")
		app.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
		var err error
		if opt.SlotListeners, err = sockets.BindSlots(app, a.workers); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			for _, set := range opt.SlotListeners {
				for _, f := range set {
					f.Close()
				}
			}
		})
		a.addr = sockets.BoundAddr(opt.SlotListeners[0][0])
	} else {
		var l *os.File
		l, a.addr = tcpListener(t, "http")
		opt.Listeners = []*os.File{l}
	}
	writeFile(t, file, a.toml(t))
	app, err := appfile.ParseFile(file)
	if err != nil {
		t.Fatal(err)
	}
	opt.App = app
	rec, stop := startRun(t, opt)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("dispatcher log:\n%s", opt.Stderr.(*testsync.Buffer).String())
		}
	})
	rec.waitNotify(t, 20*time.Second, "READY=1")
	return &reloadFixture{file: file, sock: filepath.Join(opt.RuntimeDir, control.SocketName), addr: a.addr, rec: rec, stop: stop,
		logs: opt.Stderr.(*testsync.Buffer), slots: opt.SlotListeners}
}

func (f *reloadFixture) rewrite(t *testing.T, a appFile) {
	t.Helper()
	a.addr = f.addr
	writeFile(t, f.file, a.toml(t))
}

func (f *reloadFixture) call(t testing.TB, timeout time.Duration, req control.Request) (*control.Reply, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return control.Call(ctx, f.sock, req)
}

func (f *reloadFixture) status(t *testing.T) *control.Status {
	t.Helper()
	rep, err := f.call(t, 5*time.Second, control.Request{Cmd: control.CmdStatus})
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	return rep.Status
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// gens returns the generations of the workers that answer n requests.
func gens(t *testing.T, addr string, n int) map[string]int {
	t.Helper()
	seen := map[string]int{}
	for range n {
		body, err := get("http://" + addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		seen[field(body, "gen")]++
	}
	return seen
}

// TestReload: a reload through the control socket replaces every worker
// with a generation-2 one, the old ones end gracefully, and systemd hears
// RELOADING=1 with MONOTONIC_USEC= and then READY=1.
func TestReload(t *testing.T) {
	t.Parallel()
	a := appFile{workers: 3, batch: 2}
	f := startFromFile(t, a)
	before := f.status(t)
	if before.Generation != 1 || len(before.Workers) != 3 || before.State != "ready" {
		t.Fatalf("status before: %+v", before)
	}
	if _, err := f.call(t, 30*time.Second, control.Request{Cmd: control.CmdReload}); err != nil {
		t.Fatalf("reload: %v", err)
	}
	after := f.status(t)
	if after.Generation != 2 || len(after.Workers) != 3 {
		t.Fatalf("status after: %+v", after)
	}
	for i, w := range after.Workers {
		if w.Generation != 2 || w.State != "ready" || w.PID == before.Workers[i].PID {
			t.Errorf("worker %d after the reload: %+v (before: pid %d)", i, w, before.Workers[i].PID)
		}
		if alive(before.Workers[i].PID) {
			t.Errorf("old worker pid %d still alive after the reload returned", before.Workers[i].PID)
		}
	}
	if g := gens(t, f.addr, 20); g["2"] != 20 {
		t.Errorf("generations answering after the reload: %v", g)
	}
	msg := f.rec.waitNotify(t, time.Second, "RELOADING=1")
	if !regexp.MustCompile(`(?m)^MONOTONIC_USEC=[1-9][0-9]*$`).MatchString(msg) || !regexp.MustCompile(`(?m)^STATUS=reloading \(.+\)$`).MatchString(msg) {
		t.Errorf("RELOADING=1 without a MONOTONIC_USEC= line and a STATUS= line: %q", msg)
	}
	f.rec.mu.Lock()
	var seq []string
	for _, m := range f.rec.notify {
		for _, k := range []string{"RELOADING=1", "READY=1"} {
			if strings.Contains(m, k) {
				seq = append(seq, k)
			}
		}
	}
	f.rec.mu.Unlock()
	if want := []string{"READY=1", "RELOADING=1", "READY=1"}; fmt.Sprint(seq) != fmt.Sprint(want) {
		t.Errorf("notify sequence %v, want %v", seq, want)
	}
	for _, e := range f.rec.events {
		if e.Kind == WorkerExited && e.Gen == 1 && (e.Signal != 0 || e.ExitCode != 0) {
			t.Errorf("old worker %d (pid %d) did not end gracefully: %+v", e.Worker, e.PID, e)
		}
	}
	if st := f.status(t); !strings.Contains(st.Line, "3/3 workers ready · gen 2") {
		t.Errorf("status line after the reload: %q", st.Line)
	}
}

// TestReloadFailure: new workers that exit at once fail the reload; the
// request's reply says why, the old workers keep serving, and STATUS=
// shows the failure until a reload succeeds.
func TestReloadFailure(t *testing.T) {
	t.Parallel()
	ctrl := filepath.Join(t.TempDir(), "ctrl")
	a := appFile{workers: 2, env: map[string]string{"HELPER_CTRL": ctrl}}
	f := startFromFile(t, a)
	before := f.status(t)
	writeFile(t, ctrl, "exit") // the new command exits 3
	_, err := f.call(t, 30*time.Second, control.Request{Cmd: control.CmdReload})
	if err == nil || !strings.Contains(err.Error(), "reload failed, old workers keep serving") || !strings.Contains(err.Error(), "exited with status 3 before it was ready") {
		t.Fatalf("reload with a failing command: %v", err)
	}
	after := f.status(t)
	if after.Generation != 1 || !strings.Contains(after.Line, "reload failed") {
		t.Errorf("status after the failed reload: gen %d, line %q", after.Generation, after.Line)
	}
	for i, w := range after.Workers {
		if w.PID != before.Workers[i].PID || w.Generation != 1 || w.State != "ready" {
			t.Errorf("worker %d: %+v, want the old pid %d still ready", i, w, before.Workers[i].PID)
		}
	}
	if g := gens(t, f.addr, 10); g["1"] != 10 {
		t.Errorf("generations answering after the failed reload: %v", g)
	}
	f.rec.waitNotify(t, time.Second, "STATUS=2/2 workers ready · gen 1 · shared · 0 restarts · reload failed, old workers keep serving: new worker 0")

	// Fixed: the next reload succeeds and clears the failure.
	writeFile(t, ctrl, "")
	if _, err := f.call(t, 30*time.Second, control.Request{Cmd: control.CmdReload}); err != nil {
		t.Fatalf("reload after the fix: %v", err)
	}
	if st := f.status(t); st.Generation != 2 || strings.Contains(st.Line, "failed") {
		t.Errorf("status after the fixed reload: gen %d, line %q", st.Generation, st.Line)
	}
}

// TestReloadRefused: an invalid file, a changed [[listen]] and a slow
// worker that misses ready_timeout each fail the reload, workers
// untouched or kept.
func TestReloadRefused(t *testing.T) {
	t.Parallel()
	a := appFile{workers: 1}
	f := startFromFile(t, a)
	pid := f.status(t).Workers[0].PID

	writeFile(t, f.file, "command = [\"/bin/true\"]\nwokers = 2\n")
	_, err := f.call(t, 10*time.Second, control.Request{Cmd: control.CmdReload})
	if err == nil || !strings.Contains(err.Error(), `unknown key "wokers"`) || !strings.Contains(err.Error(), "workers untouched") {
		t.Errorf("reload of an invalid file: %v", err)
	}

	changed := a
	changed.addr = "127.0.0.1:1"
	writeFile(t, f.file, changed.toml(t))
	_, err = f.call(t, 10*time.Second, control.Request{Cmd: control.CmdReload})
	if err == nil || !strings.Contains(err.Error(), "run 'systemctl daemon-reload', then 'systemctl restart t.socket'") {
		t.Errorf("reload with a changed [[listen]]: %v", err)
	}

	slow := a
	slow.readyTimeout = "300ms"
	slow.env = map[string]string{"HELPER_START_DELAY": "5s"}
	f.rewrite(t, slow)
	_, err = f.call(t, 20*time.Second, control.Request{Cmd: control.CmdReload})
	if err == nil || !strings.Contains(err.Error(), "was not ready after ready_timeout (300ms)") {
		t.Errorf("reload with a worker missing ready_timeout: %v", err)
	}
	st := f.status(t)
	if st.Workers[0].PID != pid || st.Generation != 1 {
		t.Errorf("after three refused reloads: %+v, want pid %d of gen 1", st, pid)
	}
}

// TestReloadWorkersCount: a changed workers value in the file scales as
// part of the reload, both ways.
func TestReloadWorkersCount(t *testing.T) {
	t.Parallel()
	a := appFile{workers: 2, batch: 2}
	f := startFromFile(t, a)
	for _, n := range []int{3, 1} {
		a.workers = n
		f.rewrite(t, a)
		if _, err := f.call(t, 30*time.Second, control.Request{Cmd: control.CmdReload}); err != nil {
			t.Fatalf("reload to %d workers: %v", n, err)
		}
		st := f.status(t)
		if len(st.Workers) != n {
			t.Fatalf("%d workers after the reload to %d: %+v", len(st.Workers), n, st.Workers)
		}
		for _, w := range st.Workers {
			if w.State != "ready" || w.Generation != st.Generation {
				t.Errorf("worker after the reload to %d: %+v (gen %d)", n, w, st.Generation)
			}
		}
	}
}

// TestScaleAndRestartWorker: scale up starts workers at once, scale down
// retires the highest slots gracefully, restart-worker replaces one slot.
func TestScaleAndRestartWorker(t *testing.T) {
	t.Parallel()
	f := startFromFile(t, appFile{workers: 2})
	if _, err := f.call(t, 5*time.Second, control.Request{Cmd: control.CmdScale, Workers: 4}); err != nil {
		t.Fatal(err)
	}
	testsync.WaitFor(t, 20*time.Second, "4 ready workers", func() bool {
		st := f.status(t)
		return len(st.Workers) == 4 && strings.HasPrefix(st.Line, "4/4 workers ready")
	})
	st := f.status(t)
	if _, err := f.call(t, 5*time.Second, control.Request{Cmd: control.CmdScale, Workers: 1}); err != nil {
		t.Fatal(err)
	}
	testsync.WaitFor(t, 20*time.Second, "the surplus workers to be reaped", func() bool {
		return len(f.status(t).Workers) == 1
	})
	after := f.status(t)
	if len(after.Workers) != 1 || after.Workers[0].PID != st.Workers[0].PID {
		t.Errorf("after scale 1: %+v", after.Workers)
	}
	if strings.Contains(after.Line, "restart") && !strings.Contains(after.Line, "0 restarts") {
		t.Errorf("scaling down counted restarts: %q", after.Line)
	}

	old := after.Workers[0].PID
	if _, err := f.call(t, 30*time.Second, control.Request{Cmd: control.CmdRestartWorker, Worker: new(int)}); err != nil {
		t.Fatalf("restart-worker 0: %v", err)
	}
	st = f.status(t)
	if len(st.Workers) != 1 || st.Workers[0].PID == old || st.Workers[0].State != "ready" || alive(old) {
		t.Errorf("after restart-worker 0: %+v (old pid %d alive %v)", st.Workers, old, alive(old))
	}
	seven := 7
	if _, err := f.call(t, 5*time.Second, control.Request{Cmd: control.CmdRestartWorker, Worker: &seven}); err == nil || !strings.Contains(err.Error(), "no worker 7") {
		t.Errorf("restart-worker 7: %v", err)
	}
}

// TestStatusFields: status fills pid, state, the worker's own STATUS=,
// memory and CPU from /proc, and the window the CPU figure covers.
func TestStatusFields(t *testing.T) {
	t.Parallel()
	f := startFromFile(t, appFile{workers: 2})
	st := f.status(t)
	if st.App != "t" || st.Mode != "shared" || st.State != "ready" || st.Since.IsZero() {
		t.Errorf("status: %+v", st)
	}
	for _, w := range st.Workers {
		if w.PID == 0 || w.State != "ready" || w.Status != "serving" || w.RSS < 1<<20 || w.CPUPercent < 0 || w.CPUPercent > 400 {
			t.Errorf("worker: %+v", w)
		}
	}
	for _, w := range st.Workers {
		if w.CPUWindow < cpuMinWindow.Seconds() || w.CPUWindow > cpuMaxAge.Seconds()+1 {
			t.Errorf("worker %d: CPU measured over %.3fs", w.Index, w.CPUWindow)
		}
	}
}

// TestSIGHUPReload: SIGHUP to a dispatcher process reloads it; the
// control socket lives in its $RUNTIME_DIRECTORY.
func TestSIGHUPReload(t *testing.T) {
	t.Parallel()
	l, addr := tcpListener(t, "http")
	file := filepath.Join(t.TempDir(), "t.toml")
	writeFile(t, file, appFile{workers: 2, addr: addr}.toml(t))
	rt := t.TempDir()
	p := startActivated(t, []string{"COHORT_TEST_HELPER=dispatcher", "COHORT_TEST_APPFILE=" + file, "RUNTIME_DIRECTORY=" + rt}, []*os.File{l})
	p.waitLine(t, 20*time.Second, "all 2 workers ready")
	p.cmd.Process.Signal(syscall.SIGHUP)
	p.waitLine(t, 20*time.Second, "reload done")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rep, err := control.Call(ctx, filepath.Join(rt, control.SocketName), control.Request{Cmd: control.CmdStatus})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Status.Generation != 2 {
		t.Errorf("generation after SIGHUP: %d", rep.Status.Generation)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		t.Fatal("dispatcher did not stop")
	}
}

// httpLoad is a bounded HTTP load on 127.0.0.1: conc clients, each request on
// a new connection, until stop is closed or max requests were sent.
type httpLoad struct {
	ok, errs, non2xx atomic.Int64
	mu               sync.Mutex
	firstErr         error
	wg               sync.WaitGroup
}

func startLoad(addr string, conc int, max int64, stop <-chan struct{}) *httpLoad {
	ld := &httpLoad{}
	var sent atomic.Int64
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for range conc {
		ld.wg.Go(func() {
			for sent.Add(1) <= max {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := client.Get("http://" + addr + "/")
				if err != nil {
					ld.errs.Add(1)
					ld.mu.Lock()
					if ld.firstErr == nil {
						ld.firstErr = err
					}
					ld.mu.Unlock()
					continue
				}
				resp.Body.Close()
				if resp.StatusCode/100 != 2 {
					ld.non2xx.Add(1)
				} else {
					ld.ok.Add(1)
				}
			}
		})
	}
	return ld
}

// TestReloadZeroDrop: a bounded load through a reload of 4 workers sees
// no connection error and no non-2xx answer, in every mode, also when new
// workers take 2 s to become ready.
func TestReloadZeroDrop(t *testing.T) {
	t.Parallel()
	for _, mode := range []appfile.Mode{appfile.ModeShared, appfile.ModeRoundRobin, appfile.ModeReusePort} {
		for _, slow := range []bool{false, true} {
			name := string(mode)
			if slow {
				name += "/slow-start"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				a := appFile{workers: 4, mode: string(mode)}
				f := startFromFile(t, a)
				if slow {
					a.env = map[string]string{"HELPER_START_DELAY": "2s"}
					f.rewrite(t, a)
				}
				stop := make(chan struct{})
				ld := startLoad(f.addr, 8, 200000, stop)
				defer func() { close(stop); ld.wg.Wait() }()
				testsync.WaitFor(t, 30*time.Second, "load under way", func() bool { return ld.ok.Load() > 50 })
				start := time.Now()
				if _, err := f.call(t, 60*time.Second, control.Request{Cmd: control.CmdReload}); err != nil {
					t.Fatalf("reload: %v", err)
				}
				took := time.Since(start)
				before := ld.ok.Load()
				testsync.WaitFor(t, 30*time.Second, "load after the reload", func() bool { return ld.ok.Load() > before+50 })
				close(stop)
				ld.wg.Wait()
				stop = make(chan struct{})
				t.Logf("reload of 4 workers took %s; load: %d ok, %d connection errors, %d non-2xx", took.Round(time.Millisecond), ld.ok.Load(), ld.errs.Load(), ld.non2xx.Load())
				if ld.errs.Load() != 0 || ld.non2xx.Load() != 0 {
					t.Errorf("%d connection errors (first: %v), %d non-2xx answers; want 0 and 0", ld.errs.Load(), ld.firstErr, ld.non2xx.Load())
				}
				if st := f.status(t); st.Generation != 2 {
					t.Errorf("generation after the reload: %d", st.Generation)
				}
			})
		}
	}
}
