package dispatcher

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation"
	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testsync"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// helperCohortWorker is a Go worker on cohort's activation library, so
// the same program serves in shared and in round-robin mode: it listens
// on the socket named "http" and answers like helperWorker ("/" with its
// identity, "/slow?ms=N" after N ms). The first Accept sends READY=1;
// SIGTERM shuts it down gracefully.
func helperCohortWorker() int {
	files, err := activation.Inherit()
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper cohort worker:", err)
		return 4
	}
	ln, err := files.Listen("http", "")
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper cohort worker:", err)
		return 4
	}
	files.Close()
	if os.Getenv("HELPER_PROXY") == "1" {
		ln = proxyListener{ln}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "worker=%s pid=%d gen=%s listener=%s\n",
			os.Getenv("COHORT_WORKER"), os.Getpid(), os.Getenv("COHORT_GENERATION"), ln.Addr().Network())
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		fmt.Println("slow-start")
		time.Sleep(time.Duration(ms) * time.Millisecond)
		fmt.Fprintf(w, "worker=%s slow done by pid %d\n", os.Getenv("COHORT_WORKER"), os.Getpid())
	})
	// "/work?ms=N" takes N ms, ten times that on the worker named by
	// HELPER_SLOW_WORKER: a worker whose requests are 10x slower.
	slow := os.Getenv("HELPER_SLOW_WORKER") != "" && os.Getenv("HELPER_SLOW_WORKER") == os.Getenv("COHORT_WORKER")
	mux.HandleFunc("/work", func(w http.ResponseWriter, r *http.Request) {
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		if slow {
			ms *= 10
		}
		time.Sleep(time.Duration(ms) * time.Millisecond)
		fmt.Fprintf(w, "worker=%s\n", os.Getenv("COHORT_WORKER"))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 30 * time.Second}
	if err := activation.Serve(context.Background(), srv, ln, 10*time.Second); err != nil {
		fmt.Fprintln(os.Stderr, "helper cohort worker:", err)
		return 1
	}
	return 0
}

// proxyListener reads and drops a PROXY protocol v1 line at the start of
// each connection, as a server behind a load balancer does (HELPER_PROXY).
type proxyListener struct{ net.Listener }

func (l proxyListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	for n := 0; n < 108; n++ {
		if _, err := c.Read(b[:]); err != nil || b[0] == '\n' {
			break
		}
	}
	c.SetReadDeadline(time.Time{})
	return c, nil
}

// rrApp is an app of n helperCohortWorker processes in round-robin mode.
func rrApp(t testing.TB, n int) *appfile.App {
	t.Helper()
	app := testApp(t, n, nil)
	app.Environment["COHORT_TEST_HELPER"] = "cohort-worker"
	app.Mode = appfile.ModeRoundRobin
	app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
	return app
}

// pythonRRWorker returns the command of examples/python/rr_worker.py
// (without python3: testtool.Need).
func pythonRRWorker(t testing.TB) []string {
	t.Helper()
	py := testtool.Need(t, "python3")
	return []string{py, filepath.Join(repoRoot(t), "examples", "python", "rr_worker.py")}
}

// workerOf returns the worker index an answer names: "worker=N" (the
// helpers) or "hello from worker N" (the examples).
func workerOf(body string) string {
	if w := field(body, "worker"); w != "" {
		return w
	}
	if rest, ok := strings.CutPrefix(body, "hello from worker "); ok {
		if f := strings.Fields(rest); len(f) > 0 {
			return f[0]
		}
	}
	return ""
}

// spread sends n requests, each on a new connection, from conc clients and
// counts the answers per worker. Every request must succeed.
func spread(t testing.TB, addr string, n, conc int) map[string]int {
	t.Helper()
	var (
		mu     sync.Mutex
		counts = map[string]int{}
		errs   []error
		wg     sync.WaitGroup
		next   = make(chan struct{}, n)
	)
	for range n {
		next <- struct{}{}
	}
	close(next)
	for range conc {
		wg.Go(func() {
			c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
			for range next {
				body, err := getWith(c, "http://"+addr+"/")
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else {
					counts[workerOf(body)]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d of %d requests failed, first: %v", len(errs), n, errs[0])
	}
	return counts
}

func getWith(c *http.Client, url string) (string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != 200 {
		err = fmt.Errorf("status %s", resp.Status)
	}
	return string(b), err
}

// maxMin is the largest count over the smallest, over want workers.
func maxMin(counts map[string]int, want int) float64 {
	if len(counts) < want {
		return 0
	}
	lo, hi := -1, 0
	for _, c := range counts {
		if lo < 0 || c < lo {
			lo = c
		}
		hi = max(hi, c)
	}
	if lo <= 0 {
		return 0
	}
	return float64(hi) / float64(lo)
}

// waitSpoken returns once every one of the n workers has spoken the
// round-robin protocol as the balancer sees it. Until a worker's HELLO
// has been read, the balancer gives it one connection at a time
// (balance.limitLocked) and rotation skips it while it holds that one,
// so counts per worker are not even; and that HELLO is read by the
// balancer's receiver for the channel, in no order with the READY=1 that
// the loop reads from the notify socket. Requests, one at a time, until
// every worker has answered; then status is polled until no worker holds
// a connection: the receiver read the ACK and CLOSED of each, which come
// after the worker's HELLO on its channel.
func waitSpoken(t testing.TB, addr, sock string, n int) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	seen := map[string]bool{}
	testsync.WaitFor(t, 20*time.Second, fmt.Sprintf("an answer from each of %d workers", n), func() bool {
		body, err := getWith(c, "http://"+addr+"/")
		if err != nil {
			t.Fatalf("warm-up request: %v", err)
		}
		seen[workerOf(body)] = true
		return len(seen) == n
	})
	testsync.WaitFor(t, 20*time.Second, "every worker's connections acknowledged and closed", func() bool {
		ws := callStatus(t, sock).Workers
		if len(ws) != n {
			return false
		}
		for _, w := range ws {
			if w.Handed == 0 || w.Active != 0 {
				return false
			}
		}
		return true
	})
}

// TestRoundRobinServes: the same Go program (cohort's activation library)
// and the Python example each serve in round-robin mode: every worker
// answers, the STATUS= line names the mode, and a stop is graceful.
func TestRoundRobinServes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		command func(t *testing.T) []string
	}{
		{"go", nil},
		{"python", func(t *testing.T) []string { return pythonRRWorker(t) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			app := rrApp(t, 2)
			if tc.command != nil {
				app.Command = tc.command(t)
			}
			l, addr := tcpListener(t, "http")
			rt := t.TempDir()
			rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{l}, RuntimeDir: rt})
			rec.waitNotify(t, 20*time.Second, "READY=1")
			rec.waitNotify(t, time.Second, "STATUS=2/2 workers ready · gen 1 · round-robin · 0 restarts")
			// Strict turns hold only between workers that have spoken;
			// then none is skipped: neither is handed more than 20,
			// fewer than max_pending (64).
			waitSpoken(t, addr, filepath.Join(rt, control.SocketName), 2)
			counts := spread(t, addr, 40, 4)
			if counts["0"] != 20 || counts["1"] != 20 {
				t.Errorf("answers per worker %v, want 20 each", counts)
			}
			if err := stop(); err != nil {
				t.Fatal(err)
			}
			for _, e := range rec.events {
				if e.Kind == WorkerExited && (e.ExitCode != 0 || e.RestartIn != 0) {
					t.Errorf("worker %d (pid %d) ended with %+v, want a graceful exit 0 on stop", e.Worker, e.PID, e)
				}
			}
		})
	}
}

// TestRoundRobinKillQueued: a worker that stops reading its channel (here:
// SIGSTOP) gets at most max_pending connections, the others get the rest;
// when it is killed with SIGKILL, or drains on SIGTERM (closing its
// channel), the connections queued for it go to another worker, and every
// client gets a full answer. Go and Python workers alike.
func TestRoundRobinKillQueued(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		command func(t *testing.T) []string
		sig     syscall.Signal
	}{
		{"go-kill", nil, syscall.SIGKILL},
		{"go-term", nil, syscall.SIGTERM},
		{"python-kill", func(t *testing.T) []string { return pythonRRWorker(t) }, syscall.SIGKILL},
		{"python-term", func(t *testing.T) []string { return pythonRRWorker(t) }, syscall.SIGTERM},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const (
				n          = 20
				maxPending = 4
			)
			app := rrApp(t, 2)
			app.MaxPending = maxPending
			if tc.command != nil {
				app.Command = tc.command(t)
			}
			l, addr := tcpListener(t, "http")
			rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}})
			rec.waitNotify(t, 20*time.Second, "READY=1")
			spread(t, addr, 4, 1) // both workers took connections: they are past start-up

			from := 0
			victim := rec.wait(t, &from, time.Second, "worker 1 ready", func(e Event) bool { return e.Kind == WorkerReady && e.Worker == 1 })
			if err := syscall.Kill(victim.PID, syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { syscall.Kill(victim.PID, syscall.SIGKILL) })
			// kill returns before the group stop is complete: a thread
			// may still run until it is scheduled and stops.
			testsync.WaitFor(t, 30*time.Second, "every thread of the victim stopped", func() bool { return allStopped(victim.PID) })

			type result struct {
				body string
				err  error
			}
			results := make(chan result, n)
			for range n {
				go func() {
					c := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
					b, err := getWith(c, "http://"+addr+"/")
					results <- result{b, err}
				}()
			}
			var bodies []string
			collect := func(k int, within time.Duration) {
				deadline := time.After(within)
				for range k {
					select {
					case r := <-results:
						if r.err != nil {
							t.Fatalf("request failed: %v", r.err)
						}
						bodies = append(bodies, r.body)
					case <-deadline:
						t.Fatalf("%d answers within %s, want %d (the rest queued for the stopped worker)", len(bodies), within, n-maxPending)
					}
				}
			}
			collect(n-maxPending, 15*time.Second)
			for _, b := range bodies {
				if workerOf(b) != "0" {
					t.Errorf("answer from the stopped worker: %q", b)
				}
			}
			select {
			case r := <-results:
				t.Fatalf("answer %q (%v) although %d connections should be queued for the stopped worker", r.body, r.err, maxPending)
			case <-time.After(100 * time.Millisecond):
			}
			if err := syscall.Kill(victim.PID, tc.sig); err != nil {
				t.Fatal(err)
			}
			if tc.sig != syscall.SIGKILL {
				syscall.Kill(victim.PID, syscall.SIGCONT)
			}
			collect(maxPending, 15*time.Second)
			rec.wait(t, &from, 10*time.Second, "the victim's exit", func(e Event) bool { return e.Kind == WorkerExited && e.PID == victim.PID })
		})
	}
}

// allStopped reports whether every thread of pid is stopped (state T).
func allStopped(pid int) bool {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil || len(ents) == 0 {
		return false
	}
	for _, e := range ents {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, e.Name()))
		if err != nil {
			return false
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 || i+2 >= len(s) || s[i+2] != 'T' {
			return false
		}
	}
	return true
}

// TestRoundRobinSlowClients: the dispatcher never reads from a
// connection, so clients that connect and send nothing delay nobody, even
// with max_pending = 1.
func TestRoundRobinSlowClients(t *testing.T) {
	t.Parallel()
	app := rrApp(t, 2)
	app.MaxPending = 1
	l, addr := tcpListener(t, "http")
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}})
	rec.waitNotify(t, 20*time.Second, "READY=1")
	for range 20 {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	start := time.Now()
	counts := spread(t, addr, 20, 2)
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("20 requests behind 20 silent connections took %s", took)
	}
	// Every worker still gets connections beside its silent ones. Not
	// necessarily among those 20: with max_pending = 1 a worker is skipped
	// while one connection it was handed is unacknowledged, and a worker
	// that is not scheduled for the few milliseconds the 20 take, holding
	// a silent one, rightly gets none of them. So requests go on, one at a
	// time, until each worker has answered one.
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	testsync.WaitFor(t, 10*time.Second, fmt.Sprintf("an answer from each worker (%v in the 20)", counts), func() bool {
		if len(counts) == 2 {
			return true
		}
		body, err := getWith(c, "http://"+addr+"/")
		if err != nil {
			t.Fatalf("request behind the silent connections: %v", err)
		}
		counts[workerOf(body)]++
		return false
	})
}

// TestRoundRobinFairness: 10,000 short requests, each on its own
// connection, over 4 workers: the busiest worker serves at most 10% more
// than the idlest. The same load in shared mode is logged for comparison.
func TestRoundRobinFairness(t *testing.T) {
	t.Parallel()
	n := 10000
	if testing.Short() {
		n = 2000
	}
	run := func(mode appfile.Mode) map[string]int {
		app := rrApp(t, 4)
		app.Mode = mode
		l, addr := tcpListener(t, "http")
		rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{l}})
		defer stop()
		rec.waitNotify(t, 20*time.Second, "READY=1")
		return spread(t, addr, n, 8)
	}
	rr := run(appfile.ModeRoundRobin)
	ratio := maxMin(rr, 4)
	t.Logf("round-robin: %d requests over 4 workers: %s, max/min %.3f", n, countsString(rr), ratio)
	if ratio == 0 || ratio > 1.1 {
		t.Errorf("round-robin max/min = %.3f (%s), want ≤ 1.1", ratio, countsString(rr))
	}
	if testing.Short() {
		return
	}
	sh := run(appfile.ModeShared)
	t.Logf("shared: %d requests over 4 workers: %s, max/min %.3f", n, countsString(sh), maxMin(sh, 4))
}

func countsString(counts map[string]int) string {
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(&b, "%s:%d", k, counts[k])
	}
	return b.String()
}

// TestRoundRobinFDsReturn: after a few thousand connections the
// dispatcher (its own process) has as many fds open as before: every
// passed connection's copy is closed once acknowledged.
func TestRoundRobinFDsReturn(t *testing.T) {
	t.Parallel()
	app := rrApp(t, 2)
	l, addr := tcpListener(t, "http")
	d := startDispatcherProc(t, app, []*os.File{l})
	d.waitLine(t, 20*time.Second, "all 2 workers ready")
	spread(t, addr, 10, 2)
	pid := d.cmd.Process.Pid
	base := fdCount(t, pid)
	spread(t, addr, 3000, 8)
	testsync.WaitFor(t, 30*time.Second, "fd count back to baseline", func() bool { return fdCount(t, pid) <= base })
}

// fdCount is the number of open fds of pid.
func fdCount(t testing.TB, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// rssKB is pid's resident set size in kB.
func rssKB(t testing.TB, pid int) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.Fields(rest)[0])
			return n
		}
	}
	return 0
}

// TestRoundRobinLeastConnections: with balance = "least-connections" new
// connections go to the worker with fewer open ones. Worker 1 is stopped
// while 6 silent connections arrive, so that it takes one (then it is
// full: max_pending = 1) and worker 0 the other 5; once worker 1 runs
// again, short requests go to it, where round-robin would alternate.
func TestRoundRobinLeastConnections(t *testing.T) {
	t.Parallel()
	app := rrApp(t, 2)
	app.Balance = appfile.BalanceLeastConnections
	app.MaxPending = 1
	// Worker 1 is stopped with a connection it cannot acknowledge; on a
	// loaded machine the default ack_timeout (10 s) could end before the
	// test does and replace it, which is another test's subject.
	app.AckTimeout = appfile.MaxAckTimeout
	l, addr := tcpListener(t, "http")
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}})
	rec.waitNotify(t, 20*time.Second, "READY=1")
	spread(t, addr, 2, 1) // both past start-up
	from := 0
	w0 := rec.wait(t, &from, time.Second, "worker 0 ready", func(e Event) bool { return e.Kind == WorkerReady && e.Worker == 0 })
	from = 0
	w1 := rec.wait(t, &from, time.Second, "worker 1 ready", func(e Event) bool { return e.Kind == WorkerReady && e.Worker == 1 })
	if err := syscall.Kill(w1.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(w1.PID, syscall.SIGCONT) })
	testsync.WaitFor(t, 30*time.Second, "worker 1 stopped", func() bool { return allStopped(w1.PID) })
	base := fdCount(t, w0.PID)
	for range 6 {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	testsync.WaitFor(t, 30*time.Second, "worker 0 holding 5 silent connections", func() bool { return fdCount(t, w0.PID) >= base+5 })
	syscall.Kill(w1.PID, syscall.SIGCONT)
	// With max_pending = 1, worker 1 can take a new connection only once
	// the dispatcher has read its acknowledgement of the silent one, which
	// it sends after SIGCONT: until then the requests rightly go to
	// worker 0. A request that lands on worker 1 says that moment passed.
	testsync.WaitFor(t, 10*time.Second, "worker 1 taking connections again", func() bool {
		return spread(t, addr, 1, 1)["1"] == 1
	})

	counts := spread(t, addr, 10, 1)
	// Worker 1 has 1 open connection plus those of these requests that
	// linger (a server that closes first waits a moment), worker 0 has 5.
	if counts["0"] > 2 {
		t.Errorf("worker 0 (5 open connections) got %d of 10 new ones (%s); want at most 2", counts["0"], countsString(counts))
	}
}

// TestRunModeRejectsUnknown: Run refuses modes it does not know, and
// reuseport mode without its per-worker sockets.
func TestRunModeRejectsUnknown(t *testing.T) {
	l, _ := tcpListener(t, "http")
	for mode, want := range map[appfile.Mode]string{
		"stolen-work":         `mode "stolen-work": unknown mode`,
		appfile.ModeReusePort: "reuseport mode: no listening sockets",
	} {
		app := rrApp(t, 1)
		app.Mode = mode
		err := Run(context.Background(), Options{App: app, Listeners: []*os.File{l}})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Run with mode %q = %v, want %q", mode, err, want)
		}
	}
}

// TestGoExampleRoundRobin: examples/hello, built as is, serves in
// round-robin mode too: both workers answer in turn, and they stop
// gracefully.
func TestGoExampleRoundRobin(t *testing.T) {
	t.Parallel()
	bin := helloBinary(t)
	app := rrApp(t, 2)
	app.Command = []string{bin}
	l, addr := tcpListener(t, "http")
	rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{l}})
	rec.waitNotify(t, 30*time.Second, "READY=1")
	counts := spread(t, addr, 10, 1)
	if counts["0"] != 5 || counts["1"] != 5 {
		t.Errorf("answers per worker %v, want 5 each in turn", counts)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	for _, e := range rec.events {
		if e.Kind == WorkerExited && (e.ExitCode != 0 || e.RestartIn != 0) {
			t.Errorf("worker %d (pid %d) ended with %+v, want a graceful exit 0 on stop", e.Worker, e.PID, e)
		}
	}
}
