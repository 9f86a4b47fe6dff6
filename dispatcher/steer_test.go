package dispatcher

import (
	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/testsync"

	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
)

// helperSteer is a worker that tries to steer its own dispatcher through
// the control socket it finds next to $NOTIFY_SOCKET, as issue 14 found a
// worker could: from itself, from a grandchild, and from a daemon it
// double-forks and detaches with setsid. Each attempt appends a line
// "ROLE CMD PPID RESULT" to $HELPER_STEER_OUT. Then the worker waits to
// be stopped.
func helperSteer() int {
	out := os.Getenv("HELPER_STEER_OUT")
	sock := filepath.Join(filepath.Dir(os.Getenv("NOTIFY_SOCKET")), control.SocketName)
	role := os.Getenv("HELPER_STEER_ROLE")
	try := func(role string) {
		zero := 0
		for _, req := range []control.Request{
			{Cmd: control.CmdScale, Workers: 3},
			{Cmd: control.CmdReload},
			{Cmd: control.CmdRestartWorker, Worker: &zero},
			{Cmd: control.CmdSignal, Signal: "SIGKILL"},
			{Cmd: control.CmdStatus},
		} {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := control.Call(ctx, sock, req)
			cancel()
			res := "ok"
			if err != nil {
				res = strings.ReplaceAll(err.Error(), "\n", " ")
			}
			f, ferr := os.OpenFile(out, os.O_WRONLY|os.O_APPEND, 0)
			if ferr != nil {
				fmt.Fprintln(os.Stderr, ferr)
				return
			}
			fmt.Fprintf(f, "%s %s %d %s\n", role, req.Cmd, os.Getppid(), res)
			f.Close()
		}
	}
	run := func(role string, attr *syscall.SysProcAttr) *exec.Cmd {
		self, _ := os.Executable()
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), "HELPER_STEER_ROLE="+role, fmt.Sprintf("HELPER_STEER_PARENT=%d", os.Getpid()))
		cmd.SysProcAttr = attr
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return nil
		}
		return cmd
	}
	switch role {
	case "grandchild":
		try(role)
		return 0
	case "detacher":
		// Start the daemon and leave it: it is re-parented to the nearest
		// subreaper.
		run("orphan", &syscall.SysProcAttr{Setsid: true})
		return 0
	case "orphan":
		parent := os.Getenv("HELPER_STEER_PARENT")
		for deadline := time.Now().Add(10 * time.Second); fmt.Sprint(os.Getppid()) == parent && time.Now().Before(deadline); {
			time.Sleep(5 * time.Millisecond)
		}
		try(role)
		return 0
	}
	try("worker")
	if c := run("grandchild", nil); c != nil {
		c.Wait()
	}
	if c := run("detacher", nil); c != nil {
		c.Wait()
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	<-sigs
	return 0
}

// TestWorkerCannotSteer (issue 14 item 6): a worker, its grandchild and a
// setsid daemon it detached cannot scale, reload or restart workers
// through the control socket; they may read status. The dispatcher runs
// in a process of its own, the child subreaper as under cohort dispatch;
// this test process, outside its tree, is the operator and still can.
func TestWorkerCannotSteer(t *testing.T) {
	t.Parallel()
	out := filepath.Join(t.TempDir(), "steer.out")
	writeFile(t, out, "")
	app := testApp(t, 1, map[string]string{"COHORT_TEST_HELPER": "steer", "HELPER_STEER_OUT": out})
	// The steer helper never accepts: "listening" would never call it ready.
	app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
	l, _ := tcpListener(t, "http")
	js, err := json.Marshal(app)
	if err != nil {
		t.Fatal(err)
	}
	rt := t.TempDir()
	p := startActivated(t, []string{"COHORT_TEST_HELPER=dispatcher", "COHORT_TEST_APP=" + string(js), "RUNTIME_DIRECTORY=" + rt}, []*os.File{l})
	p.waitLine(t, 20*time.Second, "all 1 workers ready")
	dispatcherPID := p.cmd.Process.Pid
	var b []byte
	testsync.WaitFor(t, 30*time.Second, "the 15 attempts of worker, grandchild and orphan", func() bool {
		b, _ = os.ReadFile(out)
		return strings.Count(string(b), "\n") >= 15
	})
	t.Logf("attempts (role cmd ppid result):\n%s", b)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	got := map[string]string{}
	for _, l := range lines {
		f := strings.SplitN(l, " ", 4)
		if len(f) != 4 {
			t.Fatalf("bad line %q in:\n%s", l, b)
		}
		got[f[0]+" "+f[1]] = f[3]
		if f[0] == "orphan" && f[2] != fmt.Sprint(dispatcherPID) {
			t.Errorf("the detached daemon's parent is %s, not the dispatcher (%d): no subreaper", f[2], dispatcherPID)
		}
	}
	for _, role := range []string{"worker", "grandchild", "orphan"} {
		for _, cmd := range []string{control.CmdScale, control.CmdReload, control.CmdRestartWorker, control.CmdSignal} {
			if res, ok := got[role+" "+cmd]; !ok || !strings.Contains(res, "permission denied") {
				t.Errorf("%s %s: %q, want a refusal", role, cmd, res)
			}
		}
		if res := got[role+" "+control.CmdStatus]; res != "ok" {
			t.Errorf("%s status: %q, want ok", role, res)
		}
	}
	sock := filepath.Join(rt, control.SocketName)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rep, err := control.Call(ctx, sock, control.Request{Cmd: control.CmdStatus})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Status.Workers) != 1 || rep.Status.Generation != 1 || rep.Status.Workers[0].Restarts != 0 {
		t.Errorf("the workers changed what runs: %+v", rep.Status)
	}
	if _, err := control.Call(ctx, sock, control.Request{Cmd: control.CmdScale, Workers: 2}); err != nil {
		t.Errorf("the operator's scale: %v", err)
	}
	p.waitLine(t, 20*time.Second, "scaled from 1 to 2 workers")
}
