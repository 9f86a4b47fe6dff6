package dispatcher

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testsync"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// callStatus asks the control socket sock for the status.
func callStatus(t testing.TB, sock string) *control.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rep, err := control.Call(ctx, sock, control.Request{Cmd: control.CmdStatus})
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	return rep.Status
}

// TestStatusCountsTheTree: a worker whose main process sleeps while the
// child it forked burns a CPU and holds 64 MiB, and a daemon it
// double-forked out of its group (adopted by the dispatcher as subreaper)
// burns another: status shows the child's and the daemon's CPU and
// memory for the worker, over a recent window.
func TestStatusCountsTheTree(t *testing.T) {
	t.Parallel()
	py := testtool.Python(t)
	burn := `import sys, time
b = bytearray(64 << 20)
for i in range(0, len(b), 4096): b[i] = 1
end = time.time() + 60
while time.time() < end: pass`
	rt := t.TempDir()
	script := filepath.Join(rt, "burn.py")
	writeFile(t, script, burn)
	app := appfile.New("t")
	app.Command = []string{"/bin/sh", "-c", fmt.Sprintf(`%s %s & setsid sh -c '%s %s & exit 0'; exec sleep 60`, py, script, py, script)}
	app.Workers = appfile.Workers{N: 1}
	app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
	app.StopTimeout = 5 * time.Second
	p := startActivated(t, []string{"COHORT_TEST_HELPER=dispatcher", "COHORT_TEST_APP=" + appJSON(t, app), "RUNTIME_DIRECTORY=" + rt}, nil)
	p.waitLine(t, 20*time.Second, "all 1 workers ready")
	sock := filepath.Join(rt, control.SocketName)
	var w control.Worker
	testsync.WaitFor(t, 20*time.Second, "both burners counted", func() bool {
		w = callStatus(t, sock).Workers[0]
		return w.CPUPercent > 60 && w.RSS > 2*64<<20
	})
	if own, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", w.PID)); !strings.Contains(string(own), "(sleep)") {
		t.Errorf("worker %d is not the sleeping shell: %s", w.PID, own)
	}
	if w.CPUWindow < cpuMinWindow.Seconds() || w.CPUWindow > cpuMaxAge.Seconds()+1 {
		t.Errorf("CPU window %.3fs", w.CPUWindow)
	}
	t.Logf("worker: cpu %.1f%% over %.2fs, rss %d MiB", w.CPUPercent, w.CPUWindow, w.RSS>>20)
}

// appJSON is app for helperDispatcher's COHORT_TEST_APP.
func appJSON(t testing.TB, app *appfile.App) string {
	t.Helper()
	js, err := json.Marshal(app)
	if err != nil {
		t.Fatal(err)
	}
	return string(js)
}

// TestCrashLoopClears: a slot that exits at once three times is in a
// crash loop (status line, and its backoff row keeps its generation);
// once its worker stays up and ready for min_uptime the label goes,
// without waiting for another exit.
func TestCrashLoopClears(t *testing.T) {
	t.Parallel()
	ctrl := filepath.Join(t.TempDir(), "ctrl")
	writeFile(t, ctrl, "exit")
	app := testApp(t, 1, map[string]string{"HELPER_CTRL": ctrl, "HELPER_READY": "1"})
	app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
	app.Restart = appfile.Restart{Initial: 300 * time.Millisecond, Max: 300 * time.Millisecond, MinUptime: 2 * time.Second}
	l, _ := tcpListener(t, "http")
	rt := t.TempDir()
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}, RuntimeDir: rt})
	sock := filepath.Join(rt, control.SocketName)
	rec.waitNotify(t, 20*time.Second, "crash loop: worker 0")
	var backoff control.Worker
	testsync.WaitFor(t, 10*time.Second, "a status in backoff", func() bool {
		backoff = callStatus(t, sock).Workers[0]
		return backoff.State == "backoff"
	})
	if backoff.Generation != 1 || backoff.PID != 0 {
		t.Errorf("slot in backoff: %+v, want generation 1 and no pid", backoff)
	}
	writeFile(t, ctrl, "stay")
	from := 0
	ready := rec.wait(t, &from, 10*time.Second, "worker ready", func(e Event) bool { return e.Kind == WorkerReady })
	testsync.WaitFor(t, 8*time.Second, "the crash loop label to clear (min_uptime 2s)", func() bool {
		return !strings.Contains(callStatus(t, sock).Line, "crash loop")
	})
	if up := time.Since(ready.Time); up < app.Restart.MinUptime-500*time.Millisecond {
		t.Errorf("crash loop cleared %s after ready, before min_uptime %s", up, app.Restart.MinUptime)
	}
	rec.waitNotify(t, 5*time.Second, "STATUS=1/1 workers ready")
}

// TestRoundRobinConns: in round-robin mode status shows per worker how
// many connections it was handed and how many it holds open.
func TestRoundRobinConns(t *testing.T) {
	t.Parallel()
	app := rrApp(t, 2)
	l, addr := tcpListener(t, "http")
	rt := t.TempDir()
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}, RuntimeDir: rt})
	rec.waitNotify(t, 20*time.Second, "READY=1")
	sock := filepath.Join(rt, control.SocketName)
	spread(t, addr, 10, 2)
	// Three connections held open (a request line not yet finished).
	for range 3 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.Write([]byte("GET / HTTP/1.1\r\n"))
	}
	var handed uint64
	var active int
	// The 10 answered connections' CLOSED may come up to 5 ms late
	// (activation/roundrobin.go, closedDelay): until then they still count
	// as open, so wait for the 3 to be handed too.
	testsync.WaitFor(t, 10*time.Second, "3 open connections of 13 handed", func() bool {
		handed, active = 0, 0
		for _, w := range callStatus(t, sock).Workers {
			handed += w.Handed
			active += w.Active
		}
		return active == 3 && handed >= 13
	})
	if handed != 13 {
		t.Errorf("handed %d connections in all, want 13", handed)
	}
}

// TestStatusGunicorn: Debian's gunicorn, whose master is the cohort
// worker and whose own worker (the master's child) spins a CPU: status
// shows that CPU for the cohort worker, not the idle master's.
func TestStatusGunicorn(t *testing.T) {
	t.Parallel()
	py := testtool.NeedPython(t, "gunicorn")
	app := appfile.New("gu")
	app.Command = []string{py, "-m", "gunicorn", "--workers", "1", "--chdir", filepath.Join(repoRoot(t), "dispatcher", "testdata", "status"), "burn:app"}
	app.Workers = appfile.Workers{N: 1}
	app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
	app.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
	app.StopTimeout = 10 * time.Second
	l, _ := tcpListener(t, "http")
	rt := t.TempDir()
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}, RuntimeDir: rt})
	rec.waitNotify(t, 30*time.Second, "READY=1")
	sock := filepath.Join(rt, control.SocketName)
	// Past its start, whose CPU a lifetime average of the master alone
	// would still show.
	w := callStatus(t, sock).Workers[0]
	time.Sleep(time.Until(w.Started.Add(5 * time.Second)))
	testsync.WaitFor(t, 60*time.Second, "gunicorn's worker's CPU in status", func() bool {
		w = callStatus(t, sock).Workers[0]
		return w.CPUPercent > 30
	})
	master, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", w.PID))
	t.Logf("cohort worker (gunicorn master %d): cpu %.1f%% over %.2fs, rss %d MiB; master alone: %s", w.PID, w.CPUPercent, w.CPUWindow, w.RSS>>20, master)
}
