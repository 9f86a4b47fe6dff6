package balance

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// fakeWorker serves one channel end as a cohort worker does, without
// HTTP: HELLO, then for each CONNS an ACK, close, and a CLOSED, until
// the channel ends; served counts the connections, after their CLOSED
// is sent. beforeClose, if not nil, gets each connection before the
// worker closes it.
func fakeWorker(end *os.File, served *atomic.Int64, beforeClose func(*os.File)) {
	serveChannel(end, beforeClose, func(w *rr.Worker, ids []uint64) bool {
		if w.Send(rr.TypeAck, ids) != nil || w.Send(rr.TypeClosed, ids) != nil {
			return false
		}
		served.Add(int64(len(ids)))
		return true
	})
}

// serveChannel says HELLO on the channel end, then for each CONNS message
// closes its connections (after beforeClose, if not nil) and has answer
// reply with their ids, until the channel ends or answer reports false;
// then it closes the end.
func serveChannel(end *os.File, beforeClose func(*os.File), answer func(w *rr.Worker, ids []uint64) bool) {
	w, err := rr.NewWorker(end)
	if err != nil {
		return
	}
	defer w.Close()
	if w.Hello() != nil {
		return
	}
	for {
		ds, err := w.Recv()
		if err != nil {
			return
		}
		ids := make([]uint64, len(ds))
		for i, d := range ds {
			ids[i] = d.ID
			if beforeClose != nil {
				beforeClose(d.File)
			}
			d.File.Close()
		}
		if !answer(w, ids) {
			return
		}
	}
}

// BenchmarkAcceptThreads measures the balancer's saturation rate, new
// connections per second accepted and handed to 4 in-process workers,
// with 1 and with 2 accept threads (event loops), 8 clients that connect
// and close as fast as they can, in interleaved rounds; it logs both
// rates and their ratio. Clients, workers and balancer share this
// process and the machine's CPUs: on N CPUs the second loop can only
// add what the others leave.
func BenchmarkAcceptThreads(b *testing.B) {
	const (
		total   = 20000
		clients = 8
		rounds  = 3
	)
	rate := map[int][]float64{}
	for range rounds {
		for _, threads := range []int{1, 2} {
			rate[threads] = append(rate[threads], acceptRate(b, threads, total, clients))
		}
	}
	med := func(x []float64) float64 {
		s := append([]float64(nil), x...)
		for i := range s {
			for j := i + 1; j < len(s); j++ {
				if s[j] < s[i] {
					s[i], s[j] = s[j], s[i]
				}
			}
		}
		return s[len(s)/2]
	}
	one, two := med(rate[1]), med(rate[2])
	b.Logf("saturation, %d connections, %d clients, median of %d rounds: 1 accept thread %.0f conns/s %v; 2 accept threads %.0f conns/s %v; 2/1 = %.2f",
		total, clients, rounds, one, rate[1], two, rate[2], two/one)
	b.ReportMetric(one, "conns/s-1thread")
	b.ReportMetric(two, "conns/s-2threads")
	b.ReportMetric(two/one, "2/1")
	for b.Loop() {
	}
}

// acceptRate runs one round: total connections through a balancer with
// threads event loops.
func acceptRate(b testing.TB, threads, total, clients int) float64 {
	n, took := acceptRun(b, threads, total, clients)
	return float64(n) / took.Seconds()
}

// testBalancer starts a balancer with cfg (its listener, names and
// loggers filled in) on a new 127.0.0.1 listener and workers fakeWorkers
// (pids 1000…), all ready. It returns the listener's address, the count
// of connections the workers served and a stop that ends it all; the
// test's cleanup calls stop too.
func testBalancer(t testing.TB, cfg Config, workers int) (addr string, served *atomic.Int64, stop func()) {
	t.Helper()
	return testBalancerHooked(t, cfg, workers, nil)
}

// testBalancerHooked is testBalancer whose workers hand each connection
// to beforeClose before they close it (fakeWorker).
func testBalancerHooked(t testing.TB, cfg Config, workers int, beforeClose func(*os.File)) (addr string, served *atomic.Int64, stop func()) {
	t.Helper()
	addr, served, ready, stop := testBalancerUnready(t, cfg, workers, beforeClose)
	ready()
	return addr, served, stop
}

// testBalancerUnready is testBalancerHooked whose workers are ready only
// once ready is called: until then nothing is accepted, and connections
// wait in the listener's backlog.
func testBalancerUnready(t testing.TB, cfg Config, workers int, beforeClose func(*os.File)) (addr string, served *atomic.Int64, ready, stop func()) {
	t.Helper()
	served = new(atomic.Int64)
	runs := make([]func(*os.File), workers)
	for i := range runs {
		runs[i] = func(end *os.File) { fakeWorker(end, served, beforeClose) }
	}
	addr, ready, stop = testBalancerRuns(t, cfg, runs)
	return addr, served, ready, stop
}

// testBalancerRuns starts a balancer with cfg (its listener, names and
// loggers filled in) on a new 127.0.0.1 listener, and a worker per run
// (slot i, pid 1000+i: a pid of its own; the balancer sends no signals),
// which serves a copy of its channel's end. The workers are ready once
// ready is called; stop, which the test's cleanup calls too, ends the
// balancer and waits for the runs to return.
func testBalancerRuns(t testing.TB, cfg Config, runs []func(end *os.File)) (addr string, ready, stop func()) {
	t.Helper()
	_, addr, ready, stop = startBalancer(t, cfg, runs)
	return addr, ready, stop
}

// startBalancer is testBalancerRuns that also returns the Balancer, for
// tests that look at its state.
func startBalancer(t testing.TB, cfg Config, runs []func(end *os.File)) (bal *Balancer, addr string, ready, stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr = ln.Addr().String()
	lf, err := ln.(*net.TCPListener).File()
	ln.Close() // lf is a copy of the socket
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listeners, cfg.Names = []*os.File{lf}, []string{"http"}
	if cfg.Warnf == nil {
		cfg.Warnf, cfg.Infof = func(string, ...any) {}, func(string, ...any) {}
	}
	bal, err = New(context.Background(), cfg)
	if err != nil {
		lf.Close()
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop = sync.OnceFunc(func() {
		bal.Stop()
		bal.Close()
		wg.Wait()
		lf.Close()
	})
	t.Cleanup(stop)
	for i, run := range runs {
		st, err := bal.NewChannel(i)
		if err != nil {
			t.Fatal(err)
		}
		fd, err := unix.FcntlInt(st.End.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		end := os.NewFile(uintptr(fd), rr.FDName)
		st.Forked(1000 + i)
		wg.Go(func() { run(end) })
	}
	ready = func() {
		for i := range runs {
			bal.Ready(1000 + i)
		}
	}
	return bal, addr, ready, stop
}

// acceptRun is acceptRate's run: how many connections the workers got,
// and in how long.
func acceptRun(b testing.TB, threads, total, clients int) (int64, time.Duration) {
	addr, served, stop := testBalancer(b, Config{MaxPending: 64, MaxHandoffs: 8, AckTimeout: 10 * time.Second, AcceptThreads: threads}, 4)
	var dialed atomic.Int64
	start := time.Now()
	var cw sync.WaitGroup
	for range clients {
		cw.Go(func() {
			for dialed.Add(1) <= int64(total) {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					b.Error(err)
					return
				}
				c.Close()
			}
		})
	}
	cw.Wait()
	for served.Load() < int64(total) && time.Since(start) < time.Minute {
		time.Sleep(time.Millisecond)
	}
	took := time.Since(start)
	stop()
	return served.Load(), took
}

// TestAcceptThreads: with 1 and with 3 event loops every connection
// reaches a worker exactly once (EPOLLEXCLUSIVE wakes one loop, and a
// loop that finds nothing to accept goes back to waiting).
func TestAcceptThreads(t *testing.T) {
	for _, threads := range []int{1, 3} {
		if n, _ := acceptRun(t, threads, 2000, 8); n != 2000 {
			t.Errorf("%d accept threads: workers got %d of 2000 connections", threads, n)
		}
	}
}

// TestLazyAcksDelayFINLittle: while a loop reads acknowledgements lazily
// (run), the dispatcher's copy of a connection keeps it open until the
// ACK is read, so a client that waits for the server's FIN depends on
// the loop's bound: with one connection at a time and nothing else to
// wake the loop, each client must still see end of stream within
// ackReadDelay (plus scheduling), not at the next connection or when
// the watcher's ack_timeout ends the wait.
func TestLazyAcksDelayFINLittle(t *testing.T) {
	addr, _, _ := testBalancer(t, Config{MaxPending: 64, MaxHandoffs: 8, AckTimeout: 10 * time.Second}, 2)
	const (
		conns = 50
		bound = 250 * time.Millisecond // ackReadDelay is 1 ms; the rest is a loaded CI machine
	)
	var worst time.Duration
	for i := range conns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		c.SetReadDeadline(start.Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1)) // the fake worker closes without a word
		took := time.Since(start)
		c.Close()
		if !errors.Is(err, io.EOF) {
			t.Fatalf("connection %d: read = %v, want EOF", i, err)
		}
		worst = max(worst, took)
	}
	t.Logf("end of stream within %v of the connect, at worst", worst)
	if worst > bound {
		t.Fatalf("a client waited %v for the server's FIN (bound %v)", worst, bound)
	}
}

// TestIdleLoopLetsTheWorldStop: a loop waits in a system call that the
// runtime cannot preempt; a stop-the-world (every GC has two) interrupts
// it with a signal, and the loop must then yield instead of waiting again,
// or the whole process stands still until a connection comes.
func TestIdleLoopLetsTheWorldStop(t *testing.T) {
	testBalancer(t, Config{MaxPending: 64, MaxHandoffs: 8, AckTimeout: 10 * time.Second, AcceptThreads: 2}, 2)
	time.Sleep(100 * time.Millisecond) // the workers' HELLOs are read; the loops wait with no timeout
	done := make(chan struct{})
	go func() {
		runtime.GC()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("runtime.GC did not return within 5 s: an idle event loop keeps the world from stopping")
	}
}

// TestAcceptInterval: with an accept interval, a loop that keeps getting
// connections accepts them in rounds at least the interval apart, so 12
// connections 5 ms apart reach the workers in a few batches instead of
// one by one, none later than the interval (plus scheduling) after its
// connect.
func TestAcceptInterval(t *testing.T) {
	const (
		conns    = 12
		spacing  = 5 * time.Millisecond
		interval = 40 * time.Millisecond
	)
	for _, every := range []time.Duration{0, interval} {
		var mu sync.Mutex
		var got []time.Time
		addr, served, stop := testBalancerHooked(t, Config{MaxPending: 64, MaxHandoffs: 8, AckTimeout: 10 * time.Second, AcceptInterval: every}, 2, func(*os.File) {
			mu.Lock()
			got = append(got, time.Now())
			mu.Unlock()
		})
		time.Sleep(50 * time.Millisecond) // the HELLOs are read
		var dialed []time.Time
		for range conns {
			dialed = append(dialed, time.Now())
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			time.Sleep(spacing)
		}
		for deadline := time.Now().Add(10 * time.Second); served.Load() < conns && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
		}
		stop()
		mu.Lock()
		arrived := slices.Clone(got)
		mu.Unlock()
		if len(arrived) != conns {
			t.Fatalf("interval %v: the workers got %d of %d connections", every, len(arrived), conns)
		}
		slices.SortFunc(arrived, func(a, b time.Time) int { return a.Compare(b) })
		batches := 1
		for i := 1; i < len(arrived); i++ {
			if arrived[i].Sub(arrived[i-1]) > spacing/2 {
				batches++
			}
		}
		// The connections arrive in order; the i-th to reach a worker
		// waited at most this long after the i-th connect.
		var worst time.Duration
		for i := range arrived {
			worst = max(worst, arrived[i].Sub(dialed[i]))
		}
		t.Logf("interval %v: %d connections in %d batches, the longest wait %v", every, conns, batches, worst)
		switch {
		case every == 0 && batches < conns/2:
			t.Errorf("no interval: %d connections %v apart reached the workers in %d batches; want about one each", conns, spacing, batches)
		case every > 0 && batches > 5:
			t.Errorf("interval %v: %d connections %v apart reached the workers in %d batches; want at most 5", every, conns, spacing, batches)
		case every > 0 && worst > every+250*time.Millisecond:
			t.Errorf("interval %v: a connection waited %v to reach a worker", every, worst)
		}
	}
}

// TestAcceptIntervalBurst: a round that stopped at one message's worth of
// connections (rr.MaxFDs) with more waiting is not followed by a sleep:
// an interval paces the rounds of a stream, it does not cap the rate at
// MaxFDs per interval. 200 connections waiting in the backlog when the
// workers become ready reach them within one interval, not in 7 rounds
// an interval apart.
func TestAcceptIntervalBurst(t *testing.T) {
	const (
		conns    = 200
		interval = 50 * time.Millisecond
	)
	var mu sync.Mutex
	var got []time.Time
	addr, served, ready, stop := testBalancerUnready(t, Config{MaxPending: 256, MaxHandoffs: 8, AckTimeout: 10 * time.Second, AcceptInterval: interval}, 2, func(*os.File) {
		mu.Lock()
		got = append(got, time.Now())
		mu.Unlock()
	})
	time.Sleep(50 * time.Millisecond) // the HELLOs are read
	for range conns {
		c, err := net.Dial("tcp", addr) // completes in the kernel: the listener's backlog
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	ready()
	for deadline := time.Now().Add(10 * time.Second); served.Load() < conns && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	stop()
	mu.Lock()
	defer mu.Unlock()
	if len(got) != conns {
		t.Fatalf("the workers got %d of %d connections", len(got), conns)
	}
	first, last := slices.MinFunc(got, time.Time.Compare), slices.MaxFunc(got, time.Time.Compare)
	t.Logf("%d waiting connections reached the workers within %v (interval %v)", conns, last.Sub(first), interval)
	if spread := last.Sub(first); spread > interval {
		t.Errorf("%d waiting connections took %v to reach the workers; want less than the interval, %v (rounds of %d an interval apart?)", conns, spread, interval, rr.MaxFDs)
	}
}
