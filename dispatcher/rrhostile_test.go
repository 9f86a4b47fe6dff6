package dispatcher

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testsync"
	"github.com/coreos/go-systemd/v22/daemon"
)

// Round-robin workers that misbehave on their channel (issue 14 item 5,
// issue 13 item 4), as real processes over real sockets.

// helperRRHostile plays a hostile round-robin worker, chosen by
// HELPER_RR_ROLE, when it is worker HELPER_RR_INDEX (any worker when
// unset) and, if HELPER_RR_ONCE names a file, only if it is the process
// that removes it (so its replacement behaves). Otherwise it is
// helperCohortWorker, or helperWorker serving one connection at a time
// and closing without shutdown(2) when HELPER_RR_NORMAL is "sequential".
// The roles work on fd 3, the channel, directly:
//
//	mute     never touches the channel (a program without cohort's library)
//	crash    exits 1 at once without a word (Node failing listen({fd: 3}))
//	deaf     says HELLO, then never reads the channel
//	hoarder  says HELLO, reads every connection and never acknowledges one
//	hangup   says HELLO, reads one message, closes the channel without an
//	         ACK and keeps running with its copies of those connections
//	garbage  says HELLO, then sends a malformed message and keeps running
//
// All but crash send READY=1 and wait for SIGTERM, which the hoarder
// ignores.
func helperRRHostile() int {
	role := os.Getenv("HELPER_RR_ROLE")
	if i := os.Getenv("HELPER_RR_INDEX"); i != "" && i != os.Getenv("COHORT_WORKER") {
		role = ""
	}
	if once := os.Getenv("HELPER_RR_ONCE"); role != "" && once != "" && os.Remove(once) != nil {
		role = ""
	}
	if role == "" {
		if os.Getenv("HELPER_RR_NORMAL") == "sequential" {
			return helperWorker()
		}
		return helperCohortWorker()
	}
	if role == "crash" {
		fmt.Fprintln(os.Stderr, "rr-hostile: crashing at start")
		return 1
	}
	var w *rr.Worker
	if role == "garbage" {
		// Raw on fd 3: HELLO, then an ACK with an fd attached (no
		// worker may send fds).
		syscall.Sendmsg(3, []byte{1, 5, 0, 0, 0, 0, 0, 0}, nil, nil, 0)
		rawACK := []byte{1, 2, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}
		syscall.Sendmsg(3, rawACK, syscall.UnixRights(0), nil, 0)
	} else if role != "mute" {
		var err error
		if w, err = rr.NewWorker(os.NewFile(3, rr.FDName)); err != nil {
			fmt.Fprintln(os.Stderr, "rr-hostile:", err)
			return 4
		}
		if err := w.Hello(); err != nil {
			fmt.Fprintln(os.Stderr, "rr-hostile:", err)
			return 4
		}
	}
	daemon.SdNotify(false, "READY=1")
	var kept []rr.Delivery // never closed: the process holds its copies
	switch role {
	case "hoarder":
		signal.Ignore(syscall.SIGTERM) // a stuck process: only SIGKILL ends it
		for {
			ds, err := w.Recv()
			if err != nil {
				break
			}
			kept = append(kept, ds...)
		}
	case "hangup":
		ds, err := w.Recv()
		if err == nil {
			kept = append(kept, ds...)
		}
		w.Close()
	}
	fmt.Fprintf(os.Stderr, "rr-hostile %s: holding %d connections\n", role, len(kept))
	time.Sleep(time.Hour) // SIGTERM ends it
	return 0
}

// hostileApp is an app of n helperRRHostile workers in round-robin mode
// with a short ack_timeout and fast stops; env adds HELPER_RR_* knobs.
func hostileApp(t testing.TB, n int, env map[string]string) *appfile.App {
	t.Helper()
	app := rrApp(t, n)
	app.Environment["COHORT_TEST_HELPER"] = "rr-hostile"
	for k, v := range env {
		app.Environment[k] = v
	}
	app.AckTimeout = time.Second
	app.StopTimeout = 2 * time.Second
	return app
}

// onceFile returns a path that exists, for HELPER_RR_ONCE.
func onceFile(t testing.TB) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "once")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// runLogged is startRun with the dispatcher's log lines kept, printed if
// the test fails.
func runLogged(t *testing.T, opt Options) (*recorder, *testsync.Buffer) {
	t.Helper()
	logs := &testsync.Buffer{}
	opt.Stdout, opt.Stderr = logs, logs
	rec, _ := startRun(t, opt)
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("COHORT_TEST_LOGS") == "1" {
			t.Logf("dispatcher output:\n%s", logs.String())
		}
	})
	return rec, logs
}

// loadCount sends n requests, each on a new connection, from conc
// clients with a client timeout, and returns the answers per worker, how
// many failed and the first error. After a minute in all, what is
// left is not sent and counts as failed, so that a dispatcher that serves
// nothing fails the test in bounded time.
func loadCount(addr string, n, conc int, timeout time.Duration) (counts map[string]int, failed int, first error) {
	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		next     = make(chan struct{}, n)
		deadline = time.Now().Add(time.Minute)
	)
	counts = map[string]int{}
	for range n {
		next <- struct{}{}
	}
	close(next)
	for range conc {
		wg.Go(func() {
			c := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
			for range next {
				var body string
				err := fmt.Errorf("not sent: the load's minute is over")
				if time.Now().Before(deadline) {
					body, err = getWith(c, "http://"+addr+"/")
				}
				mu.Lock()
				if err != nil {
					failed++
					if first == nil {
						first = err
					}
				} else {
					counts[workerOf(body)]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return counts, failed, first
}

// silentConns is how many connections TestRoundRobinDeafWorker opens and
// leaves silent before its load.
const silentConns = 1500

// TestRoundRobinDeafWorker: a worker that stops reading its channel
// cannot stop the acceptor, whatever max_pending is: the other worker
// serves meanwhile, and after ack_timeout the connections queued for the
// deaf worker go to others, so every request is answered; the deaf
// worker is replaced. (At 57c59ff the acceptor blocked in sendmsg once
// the channel's queue was full: requests failed.)
func TestRoundRobinDeafWorker(t *testing.T) {
	t.Parallel()
	for _, maxPending := range []int{1000, 65535} {
		t.Run(fmt.Sprint(maxPending), func(t *testing.T) {
			t.Parallel()
			app := hostileApp(t, 2, map[string]string{"HELPER_RR_ROLE": "deaf", "HELPER_RR_INDEX": "1", "HELPER_RR_ONCE": onceFile(t)})
			app.MaxPending = maxPending
			l, addr := tcpListener(t, "http")
			rec, logs := runLogged(t, Options{App: app, Listeners: []*os.File{l}})
			rec.waitNotify(t, 20*time.Second, "READY=1")
			// Silent connections, half of them for the deaf worker: more
			// than its channel's queue holds (a few hundred messages), so
			// that sends to it would block.
			for range silentConns {
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
			}
			const n = 2000
			start := time.Now()
			counts, failed, first := loadCount(addr, n, 16, 15*time.Second)
			took := time.Since(start)
			t.Logf("max_pending %d: %d requests in %s, %d failed, answers per worker %s", maxPending, n, took.Round(time.Millisecond), failed, countsString(counts))
			if failed > 0 {
				t.Fatalf("%d of %d requests failed with a deaf worker, first: %v", failed, n, first)
			}
			from := 0
			e := rec.wait(t, &from, 10*time.Second, "the deaf worker marked unhealthy", func(e Event) bool { return e.Kind == WorkerUnhealthy && e.Worker == 1 })
			rec.wait(t, &from, 10*time.Second, "the deaf worker's exit", func(x Event) bool { return x.Kind == WorkerExited && x.PID == e.PID })
			rec.wait(t, &from, 10*time.Second, "its replacement ready", func(x Event) bool { return x.Kind == WorkerReady && x.Worker == 1 })
			if !strings.Contains(logs.String(), "left a connection unacknowledged for ack_timeout (1s); stopping it") {
				t.Errorf("no log line about the deaf worker")
			}
			if counts := spread(t, addr, 20, 2); counts["1"] == 0 {
				t.Errorf("the replacement of the deaf worker serves nothing: %s", countsString(counts))
			}
		})
	}
}

// TestRoundRobinHoarder: with the default max_pending, a worker that
// reads its connections and never acknowledges them keeps no client
// waiting past ack_timeout; it shows as unhealthy and is replaced.
// (At 57c59ff its 64 clients waited forever while it counted as ready.)
func TestRoundRobinHoarder(t *testing.T) {
	t.Parallel()
	app := hostileApp(t, 2, map[string]string{"HELPER_RR_ROLE": "hoarder", "HELPER_RR_INDEX": "1", "HELPER_RR_ONCE": onceFile(t)})
	app.StopTimeout = 5 * time.Second
	if app.MaxPending != appfile.DefaultMaxPending {
		t.Fatalf("max_pending %d, want the default", app.MaxPending)
	}
	l, addr := tcpListener(t, "http")
	rt := t.TempDir()
	rec, _ := runLogged(t, Options{App: app, Listeners: []*os.File{l}, RuntimeDir: rt})
	rec.waitNotify(t, 20*time.Second, "READY=1")
	from := 0
	hoarder := rec.wait(t, &from, 10*time.Second, "worker 1 started", func(e Event) bool { return e.Kind == WorkerStarted && e.Worker == 1 })

	const n = 300
	counts, failed, first := loadCount(addr, n, 16, 15*time.Second)
	t.Logf("%d requests, %d failed, answers per worker %s", n, failed, countsString(counts))
	if failed > 0 {
		t.Fatalf("%d of %d requests failed with a worker that never acknowledges, first: %v", failed, n, first)
	}
	from = 0
	rec.wait(t, &from, 10*time.Second, "the hoarder marked unhealthy", func(e Event) bool { return e.Kind == WorkerUnhealthy && e.PID == hoarder.PID })
	// While it stops (it ignores SIGTERM: SIGKILL after stop_timeout),
	// the status says what is wrong with it.
	if w := workerStatus(t, rt, hoarder.PID); w.State != "unhealthy" || !strings.Contains(w.Status, "unacknowledged") {
		t.Errorf("status of the hoarder being replaced: %+v, want state unhealthy", w)
	}
	rec.waitNotify(t, 5*time.Second, "unhealthy: worker 1")
	rec.wait(t, &from, 15*time.Second, "the hoarder's exit", func(e Event) bool { return e.Kind == WorkerExited && e.PID == hoarder.PID })
	rec.wait(t, &from, 10*time.Second, "its replacement ready", func(e Event) bool { return e.Kind == WorkerReady && e.Worker == 1 })
	if counts := spread(t, addr, 20, 2); counts["1"] == 0 {
		t.Errorf("the hoarder's replacement serves nothing: %s", countsString(counts))
	}
}

// workerStatus returns the control socket's view of worker pid.
func workerStatus(t *testing.T, runtimeDir string, pid int) control.Worker {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rep, err := control.Call(ctx, filepath.Join(runtimeDir, control.SocketName), control.Request{Cmd: control.CmdStatus})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range rep.Status.Workers {
		if w.PID == pid {
			return w
		}
	}
	t.Fatalf("no worker with pid %d in %+v", pid, rep.Status.Workers)
	return control.Worker{}
}

// TestRoundRobinHangup: a worker that closes its channel without
// acknowledging what it read, and keeps running, is stopped and
// replaced; the connections it had go to the other worker, and their
// clients see the end of the answer (EOF) once the hangup worker's copies
// are gone, though the serving worker closes without shutdown(2). (At
// 57c59ff the hangup worker stayed "ready" for ever, holding the copies:
// those clients never saw EOF.)
func TestRoundRobinHangup(t *testing.T) {
	t.Parallel()
	app := hostileApp(t, 2, map[string]string{
		"HELPER_RR_ROLE": "hangup", "HELPER_RR_INDEX": "1", "HELPER_RR_ONCE": onceFile(t),
		"HELPER_RR_NORMAL": "sequential", "HELPER_DIE_FILE": filepath.Join(t.TempDir(), "never"),
	})
	l, addr := tcpListener(t, "http")
	rec, logs := runLogged(t, Options{App: app, Listeners: []*os.File{l}})
	rec.waitNotify(t, 20*time.Second, "READY=1")
	from := 0
	hangup := rec.wait(t, &from, 10*time.Second, "worker 1 started", func(e Event) bool { return e.Kind == WorkerStarted && e.Worker == 1 })

	const n = 8
	errs := make(chan error, n)
	for range n {
		go func() { errs <- readToEOF(addr, 15*time.Second) }()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	from = 0
	rec.wait(t, &from, 10*time.Second, "the hangup worker marked unhealthy", func(e Event) bool { return e.Kind == WorkerUnhealthy && e.PID == hangup.PID })
	rec.wait(t, &from, 10*time.Second, "the hangup worker's exit", func(e Event) bool { return e.Kind == WorkerExited && e.PID == hangup.PID })
	rec.wait(t, &from, 10*time.Second, "its replacement ready", func(e Event) bool { return e.Kind == WorkerReady && e.Worker == 1 })
	// The event loop sees the hangup either on the channel (EPOLLHUP) or
	// in the next send to it (EPIPE), whichever comes first.
	if out := logs.String(); !strings.Contains(out, "closed its round-robin channel; stopping it") &&
		!strings.Contains(out, "broke its round-robin channel (send") {
		t.Errorf("no log line about the closed channel")
	}
}

// TestRoundRobinGarbage: a worker that sends a malformed message is
// stopped and replaced, and the others serve meanwhile.
func TestRoundRobinGarbage(t *testing.T) {
	t.Parallel()
	app := hostileApp(t, 2, map[string]string{"HELPER_RR_ROLE": "garbage", "HELPER_RR_INDEX": "1", "HELPER_RR_ONCE": onceFile(t)})
	l, addr := tcpListener(t, "http")
	rec, logs := runLogged(t, Options{App: app, Listeners: []*os.File{l}})
	from := 0
	bad := rec.wait(t, &from, 20*time.Second, "worker 1 started", func(e Event) bool { return e.Kind == WorkerStarted && e.Worker == 1 })
	rec.wait(t, &from, 20*time.Second, "the garbage worker marked unhealthy", func(e Event) bool { return e.Kind == WorkerUnhealthy && e.PID == bad.PID })
	rec.wait(t, &from, 10*time.Second, "its replacement ready", func(e Event) bool { return e.Kind == WorkerReady && e.Worker == 1 })
	if !strings.Contains(logs.String(), "broke its round-robin channel (recv: round-robin protocol error: worker sent 1 fds); stopping it") {
		t.Errorf("no log line about the malformed message")
	}
	if counts := spread(t, addr, 20, 2); counts["0"] == 0 || counts["1"] == 0 {
		t.Errorf("answers per worker %s, want both", countsString(counts))
	}
}

// readToEOF sends one HTTP request on a new connection and reads until
// the server's end of stream, within timeout.
func readToEOF(addr string, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"); err != nil {
		return err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read until EOF: %w (got %q)", err, b)
	}
	if !strings.HasPrefix(string(b), "HTTP/1.1 200") {
		return fmt.Errorf("answer %q", b)
	}
	return nil
}

// neverSpoke is the line the dispatcher logs for a worker that never
// spoke the round-robin protocol (issue 13 item 4).
const neverSpoke = `worker %d never spoke the round-robin protocol (docs/protocol.md); for programs without cohort's library use mode = "shared" or "reuseport"`

// TestRoundRobinNeverSpoke: a program that ignores its round-robin
// channel, with the default readiness, gets one connection, and when it
// has not answered that one within ack_timeout the log names it and the
// remedy, the status line marks its slot, it is stopped and restarted
// with the backoff of a failed start; every request is served by the
// worker that does speak. A program that exits without a word is named
// too. (At 57c59ff the silent worker held max_pending clients for ever
// and nothing was logged.)
func TestRoundRobinNeverSpoke(t *testing.T) {
	t.Parallel()
	t.Run("mute", func(t *testing.T) {
		t.Parallel()
		app := hostileApp(t, 2, map[string]string{"HELPER_RR_ROLE": "mute", "HELPER_RR_INDEX": "1"})
		app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
		l, addr := tcpListener(t, "http")
		rec, logs := runLogged(t, Options{App: app, Listeners: []*os.File{l}})
		rec.waitNotify(t, 20*time.Second, "READY=1")
		const n = 200
		counts, failed, first := loadCount(addr, n, 8, 15*time.Second)
		t.Logf("%d requests, %d failed, answers per worker %s", n, failed, countsString(counts))
		if failed > 0 || counts["0"] != n {
			t.Fatalf("%d of %d requests failed (first: %v), answers %s; want all from worker 0", failed, n, first, countsString(counts))
		}
		testsync.WaitFor(t, 10*time.Second, "the never-spoke line", func() bool { return strings.Contains(logs.String(), fmt.Sprintf(neverSpoke, 1)) })
		rec.waitNotify(t, 10*time.Second, "round-robin protocol never spoken: worker 1")
		from := 0
		e := rec.wait(t, &from, 10*time.Second, "the mute worker stopped", func(e Event) bool { return e.Kind == WorkerExited && e.Worker == 1 })
		if e.RestartIn == 0 {
			t.Errorf("mute worker's exit %+v: no restart scheduled", e)
		}
		if strings.Contains(logs.String(), fmt.Sprintf(neverSpoke, 0)) {
			t.Errorf("worker 0, which speaks, is named as silent")
		}
	})
	t.Run("crash", func(t *testing.T) {
		t.Parallel()
		app := hostileApp(t, 2, map[string]string{"HELPER_RR_ROLE": "crash"})
		app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
		l, _ := tcpListener(t, "http")
		rec, logs := runLogged(t, Options{App: app, Listeners: []*os.File{l}})
		testsync.WaitFor(t, 20*time.Second, "the never-spoke lines", func() bool {
			return strings.Contains(logs.String(), fmt.Sprintf(neverSpoke, 0)) && strings.Contains(logs.String(), fmt.Sprintf(neverSpoke, 1))
		})
		rec.waitNotify(t, 10*time.Second, "round-robin protocol never spoken: workers 0,1")
	})
}
