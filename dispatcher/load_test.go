package dispatcher

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"golang.org/x/sys/unix"
)

// TestReloadFIFOEnvironmentFile (issue 14.3): a reload whose environment
// file is a FIFO nobody writes to fails at once with the old workers
// serving, and the supervision loop never stops meanwhile: status
// answers, a killed worker is restarted, and a stop takes no longer than
// stop_timeout. At 57c59ff the loop blocked in open(2) of the FIFO.
func TestReloadFIFOEnvironmentFile(t *testing.T) {
	t.Parallel()
	f := startFromFile(t, appFile{workers: 2})
	fifo := filepath.Join(t.TempDir(), "env.fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// Whatever happens, no reader stays blocked on the FIFO after the
	// test: opening it for writing releases a blocked open for reading.
	t.Cleanup(func() {
		if fd, err := unix.Open(fifo, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0); err == nil {
			unix.Close(fd)
		}
	})
	a := appFile{workers: 2, addr: f.addr}
	writeFile(t, f.file, "environment_file = ["+quote(fifo)+"]\n"+a.toml(t))

	before := f.status(t)
	reloaded := make(chan error, 1)
	go func() {
		_, err := f.call(t, 20*time.Second, control.Request{Cmd: control.CmdReload})
		reloaded <- err
	}()

	// The loop answers while (at 57c59ff: forever) the reload reads.
	time.Sleep(200 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	rep, err := control.Call(ctx, f.sock, control.Request{Cmd: control.CmdStatus})
	cancel()
	if err != nil {
		t.Fatalf("status during a reload with a FIFO environment file: %v", err)
	}
	if rep.Status.Generation != 1 {
		t.Errorf("generation during the reload: %d", rep.Status.Generation)
	}
	select {
	case err := <-reloaded:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") || !strings.Contains(err.Error(), "workers untouched") {
			t.Errorf("reload with a FIFO environment file: %v, want a refusal naming it", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("reload with a FIFO environment file did not answer within 5s")
	}

	// Reaping and restarts go on.
	f.rec.mu.Lock()
	from := len(f.rec.events)
	f.rec.mu.Unlock()
	victim := before.Workers[0].PID
	syscall.Kill(victim, syscall.SIGKILL)
	f.rec.wait(t, &from, 5*time.Second, "restart of the killed worker", func(e Event) bool {
		return e.Kind == WorkerStarted && e.Worker == 0
	})
	for i, w := range f.status(t).Workers {
		if i > 0 && w.PID != before.Workers[i].PID {
			t.Errorf("worker %d: pid %d, want the old %d", i, w.PID, before.Workers[i].PID)
		}
	}

	// And a stop is as quick as without the FIFO.
	start := time.Now()
	stopped := make(chan error, 1)
	go func() { stopped <- f.stop() }()
	select {
	case err := <-stopped:
		if err != nil {
			t.Errorf("stop: %v", err)
		}
	case <-time.After(10*time.Second + 5*time.Second):
		t.Fatalf("stop did not finish within stop_timeout + 5s")
	}
	t.Logf("stopped in %s", time.Since(start).Round(time.Millisecond))
}

// TestReloadLoadTimeout: a reload whose read never ends fails after
// LoadTimeout with the old workers serving, refuses a second reload while
// the first is read, and does not keep Run from returning.
func TestReloadLoadTimeout(t *testing.T) {
	t.Parallel()
	l, _ := tcpListener(t, "http")
	app := testApp(t, 2, map[string]string{"HELPER_READY": "1"})
	app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
	hang := make(chan struct{})
	t.Cleanup(func() { close(hang) })
	loads := make(chan struct{}, 4)
	opt := Options{
		App: app, Listeners: []*os.File{l}, RuntimeDir: t.TempDir(), LoadTimeout: time.Second,
		Load: func() (*appfile.App, error) {
			loads <- struct{}{}
			<-hang // a read that does not end
			return nil, errors.New("unblocked")
		},
	}
	rec, stop := startRun(t, opt)
	rec.waitNotify(t, 20*time.Second, "READY=1")
	sock := filepath.Join(opt.RuntimeDir, control.SocketName)
	call := func(timeout time.Duration, cmd string) (*control.Reply, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		return control.Call(ctx, sock, control.Request{Cmd: cmd})
	}
	before, err := call(3*time.Second, control.CmdStatus)
	if err != nil {
		t.Fatal(err)
	}

	reloaded := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := call(10*time.Second, control.CmdReload)
		reloaded <- err
	}()
	<-loads
	// The second reload first: status takes a CPU sample window
	// (usage.go), and the first reload gives up after LoadTimeout. The
	// status line is the loop's at the request, before that window.
	if _, err := call(3*time.Second, control.CmdReload); err == nil || !strings.Contains(err.Error(), "still being read") {
		t.Errorf("second reload while the first reads: %v", err)
	}
	if rep, err := call(3*time.Second, control.CmdStatus); err != nil {
		t.Fatalf("status while the app file is read: %v", err)
	} else if !strings.Contains(rep.Status.Line, "reloading: reading the app file") {
		t.Errorf("status line while the app file is read: %q", rep.Status.Line)
	}
	err = <-reloaded
	took := time.Since(start)
	if err == nil || !strings.Contains(err.Error(), "took longer than 1s") {
		t.Errorf("reload with a hanging read: %v", err)
	}
	if took < 900*time.Millisecond || took > 5*time.Second {
		t.Errorf("reload with a hanging read failed after %s, want about LoadTimeout (1s)", took)
	}
	after, err := call(3*time.Second, control.CmdStatus)
	if err != nil {
		t.Fatal(err)
	}
	for i, w := range after.Status.Workers {
		if w.PID != before.Status.Workers[i].PID || w.Generation != 1 {
			t.Errorf("worker %d after the failed reload: %+v, want pid %d of generation 1", i, w, before.Status.Workers[i].PID)
		}
	}

	// A stop while a read hangs: Run returns, the reload is answered.
	go func() {
		_, err := call(10*time.Second, control.CmdReload)
		reloaded <- err
	}()
	<-loads
	start = time.Now()
	if err := stop(); err != nil {
		t.Fatalf("stop while a reload reads: %v", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("stop while a reload reads took %s", took)
	}
	if err := <-reloaded; err == nil {
		t.Errorf("reload overtaken by the stop succeeded")
	}
}

func quote(s string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}
