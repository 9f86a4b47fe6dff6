package dispatcher

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// shApp is an app of one /bin/sh worker running script, ready at exec.
func shApp(t *testing.T, script string) *appfile.App {
	t.Helper()
	app := testApp(t, 1, nil)
	app.Command = []string{"/bin/sh", "-c", script}
	app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
	return app
}

// TestStopMessages: the exit line of a worker that cohort stopped says
// that cohort sent the signal (a requested stop read "was killed by
// signal 15" before), and a real crash still reads as one.
func TestStopMessages(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, script string
		stopTimeout  time.Duration
		want         string // after "worker 0 (pid N) ", before " after <uptime>"
	}{
		{"dies of stop_signal", "exec sleep 1000", 0,
			`stopped \(SIGTERM sent by cohort\)`},
		{"exits on stop_signal", "trap 'exit 0' TERM; sleep 1000 & wait", 0,
			`exited with status 0 \(SIGTERM sent by cohort\)`},
		{"exits 3 on stop_signal", "trap 'exit 3' TERM; sleep 1000 & wait", 0,
			`exited with status 3 \(SIGTERM sent by cohort\)`},
		{"ignores stop_signal", "trap '' TERM; exec sleep 1000", 300 * time.Millisecond,
			`stopped \(SIGKILL sent by cohort: it did not stop within stop_timeout 300ms\)`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			app := shApp(t, c.script)
			if c.stopTimeout > 0 {
				app.StopTimeout = c.stopTimeout
			}
			l, _ := tcpListener(t, "http")
			logs := &testsync.Buffer{}
			rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{l}, Stderr: logs})
			from := 0
			w := rec.wait(t, &from, 10*time.Second, "ready", func(e Event) bool { return e.Kind == WorkerReady })
			// sh sets its trap before it forks or execs sleep; wait for that.
			testsync.WaitFor(t, 10*time.Second, "sleep", func() bool {
				comm, _ := os.ReadFile("/proc/" + strconv.Itoa(w.PID) + "/comm")
				return string(comm) == "sleep\n" || len(childrenOf(w.PID)) > 0
			})
			if err := stop(); err != nil {
				t.Fatal(err)
			}
			re := regexp.MustCompile(`worker 0 \(pid ` + strconv.Itoa(w.PID) + `\) ` + c.want + ` after [0-9.]+m?s\n`)
			if !re.MatchString(logs.String()) {
				t.Errorf("no line matching %q in:\n%s", re, logs)
			}
			if strings.Contains(logs.String(), "killed by signal") {
				t.Errorf("a stop cohort asked for reads as a crash:\n%s", logs)
			}
		})
	}
	t.Run("crash", func(t *testing.T) {
		t.Parallel()
		app := shApp(t, "sleep 0.2; kill -SEGV $$")
		l, _ := tcpListener(t, "http")
		logs := &testsync.Buffer{}
		rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{l}, Stderr: logs})
		from := 0
		ex := rec.wait(t, &from, 10*time.Second, "the crash", func(e Event) bool { return e.Kind == WorkerExited })
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		want := "worker 0 (pid " + strconv.Itoa(ex.PID) + ") was killed by signal 11 (segmentation fault) after "
		if !strings.Contains(logs.String(), want) {
			t.Errorf("no %q in:\n%s", want, logs)
		}
	})
}

// TestKillMode: with kill_mode = "group" stop_signal reaches the
// worker's children too; with "mixed" only its main process gets it, and
// the child, which did not, is still gone once the main process exited.
// The tree is real: a sh worker whose child sh notes every SIGTERM.
func TestKillMode(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{appfile.KillModeGroup, appfile.KillModeMixed} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			mark := filepath.Join(t.TempDir(), "child")
			// The child writes its pid once its trap is set. On SIGTERM
			// the main process gives the child up to 2s to note a SIGTERM
			// of its own (the group's SIGKILL at its exit would cut that
			// short), then exits 0, leaving the child running.
			app := shApp(t, `sh -c 'trap "echo TERM >>\"$MARK\"; exit 0" TERM; echo $$ >"$MARK.pid"; sleep 1000 & wait' &
trap 'i=0; while [ ! -s "$MARK" ] && [ $i -lt 40 ]; do sleep 0.05; i=$((i+1)); done; exit 0' TERM
sleep 1000 & wait`)
			app.Environment["MARK"] = mark
			app.KillMode = mode
			l, _ := tcpListener(t, "http")
			logs := &testsync.Buffer{}
			rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{l}, Stderr: logs})
			from := 0
			w := rec.wait(t, &from, 10*time.Second, "ready", func(e Event) bool { return e.Kind == WorkerReady })
			var child int
			testsync.WaitFor(t, 10*time.Second, "the child's pid", func() bool {
				b, err := os.ReadFile(mark + ".pid")
				child, _ = strconv.Atoi(strings.TrimSpace(string(b)))
				return err == nil && child > 0
			})
			defer syscall.Kill(child, syscall.SIGKILL) // only if the test failed
			if err := stop(); err != nil {
				t.Fatal(err)
			}
			got, _ := os.ReadFile(mark)
			switch mode {
			case appfile.KillModeGroup:
				if !strings.Contains(string(got), "TERM") {
					t.Errorf("kill_mode = group: the child did not get SIGTERM")
				}
			case appfile.KillModeMixed:
				if len(got) != 0 {
					t.Errorf("kill_mode = mixed: the child got SIGTERM (%q)", got)
				}
			}
			testsync.WaitFor(t, 5*time.Second, "the child to be gone", func() bool { return !alive(child) })
			want := "worker 0 (pid " + strconv.Itoa(w.PID) + ") exited with status 0 (SIGTERM sent by cohort) after "
			if !strings.Contains(logs.String(), want) {
				t.Errorf("no %q in:\n%s", want, logs)
			}
		})
	}
}

// TestFailUnready: with FailUnready (cohort run), an app of which no
// worker is ready within ready_timeout is stopped and Run returns
// ErrNotReady, as systemd fails a service that never sends READY=1;
// one that became ready keeps running while its workers crash.
func TestFailUnready(t *testing.T) {
	t.Parallel()
	run := func(t *testing.T, app *appfile.App, timeout time.Duration) (string, error) {
		l, _ := tcpListener(t, "http")
		logs := &testsync.Buffer{}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		err := Run(ctx, Options{App: app, Listeners: []*os.File{l}, Stdout: logs, Stderr: logs, RuntimeDir: t.TempDir(), FailUnready: true})
		return logs.String(), err
	}
	t.Run("crashes at start", func(t *testing.T) {
		t.Parallel()
		app := shApp(t, "exit 3")
		app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
		app.ReadyTimeout = 500 * time.Millisecond
		start := time.Now()
		logs, err := run(t, app, 20*time.Second)
		if !errors.Is(err, ErrNotReady) {
			t.Fatalf("Run: %v, want ErrNotReady\n%s", err, logs)
		}
		if took := time.Since(start); took > 10*time.Second {
			t.Errorf("Run returned after %s, want soon after ready_timeout", took)
		}
		if !strings.Contains(logs, "stopping (no worker ready after ready_timeout 500ms)") {
			t.Errorf("no stop line:\n%s", logs)
		}
	})
	t.Run("crashes once ready", func(t *testing.T) {
		t.Parallel()
		// Ready at exec, then a crash every 100ms: restarted, not failed;
		// the context ends the run (nil) long after ready_timeout.
		// ready_timeout leaves room for the trampoline (this race-built
		// test binary) to start on a loaded machine: a CI run took 300ms
		// to exec, and a worker not ready in time is not the case here.
		app := shApp(t, "sleep 0.1; exit 3")
		app.ReadyTimeout = 1500 * time.Millisecond
		app.Restart.Max = 100 * time.Millisecond
		logs, err := run(t, app, 6*time.Second)
		if err != nil {
			t.Fatalf("Run: %v\n%s", err, logs)
		}
		if n := strings.Count(logs, "exited with status 3"); n < 3 {
			t.Errorf("%d crashes seen, want restarts after ready_timeout:\n%s", n, logs)
		}
	})
}
