package dispatcher

import (
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/sockets"
	"github.com/cohort-dev/cohort/internal/testsync"
	"golang.org/x/sys/unix"
)

// BenchmarkNewConnections compares, with a new connection per request
// (HTTP Connection: close), the same Go worker (cohort's activation
// library) alone and under a dispatcher process in shared, round-robin and
// reuseport mode, 2 workers each, in interleaved rounds. It logs requests
// per second, the ratios to shared mode (the baseline: the kernel's own
// queue, no hop) and the dispatchers' CPU time. Then ns/op is one request
// on a new connection through the round-robin dispatcher.
func BenchmarkNewConnections(b *testing.B) {
	const (
		rounds  = 6
		dur     = time.Second
		clients = 8
	)
	l, addr := tcpListener(b, "http")
	startActivated(b, []string{"COHORT_TEST_HELPER=cohort-worker"}, []*os.File{l})
	targets := []*benchTarget{{name: "alone", addr: addr}}
	for _, mode := range []appfile.Mode{appfile.ModeShared, appfile.ModeRoundRobin, appfile.ModeReusePort} {
		app := rrApp(b, 2)
		app.Mode = mode
		var (
			listeners []*os.File
			addr      string
		)
		if mode == appfile.ModeReusePort {
			listeners, addr = slotListenersAsActivated(b, app, 2)
		} else {
			var l *os.File
			l, addr = tcpListener(b, "http")
			listeners = []*os.File{l}
		}
		d := startDispatcherProc(b, app, listeners)
		d.waitLine(b, 20*time.Second, "all 2 workers ready")
		targets = append(targets, &benchTarget{name: string(mode), addr: addr, pid: d.cmd.Process.Pid})
	}
	measureRounds(b, targets, rounds, func(addr string) float64 { return load(addr, clients, dur, false) })
	a, sh, rr, rp := targets[0], targets[1], targets[2], targets[3]
	loadTime := rounds * dur
	b.Logf("new connection per request, %d clients, %d rounds of %s, 2 workers: alone %.0f req/s; shared %.0f req/s (%.2fx alone); round-robin %.0f req/s (%.2fx shared); reuseport %.0f req/s (%.2fx shared); dispatcher CPU: shared %s, round-robin %s (%.1f%% of a core), reuseport %s, in %s of load",
		clients, rounds, dur, a.rps, sh.rps, sh.rps/a.rps, rr.rps, rr.rps/sh.rps, rp.rps, rp.rps/sh.rps,
		sh.cpu.Round(time.Millisecond), rr.cpu.Round(time.Millisecond), 100*rr.cpu.Seconds()/loadTime.Seconds(), rp.cpu.Round(time.Millisecond), loadTime)

	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for b.Loop() {
		if _, err := getWith(c, "http://"+rr.addr+"/"); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(a.rps, "alone-req/s")
	b.ReportMetric(sh.rps, "shared-req/s")
	b.ReportMetric(rr.rps, "rr-req/s")
	b.ReportMetric(rp.rps, "reuseport-req/s")
	b.ReportMetric(rr.rps/sh.rps, "rr/shared")
	b.ReportMetric(rp.rps/sh.rps, "reuseport/shared")
	b.ReportMetric(100*rr.cpu.Seconds()/loadTime.Seconds(), "rr-dispatcher-cpu-%")
}

// slotListenersAsActivated binds n reuseport socket sets for app and
// returns them named as systemd passes them ("http.0", "http.1"…), for a
// dispatcher process, with their address. They are closed at cleanup.
func slotListenersAsActivated(tb testing.TB, app *appfile.App, n int) ([]*os.File, string) {
	tb.Helper()
	bind := *app
	bind.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
	slots, err := sockets.BindSlots(&bind, n)
	if err != nil {
		tb.Fatal(err)
	}
	var out []*os.File
	for i, set := range slots {
		// A new fd under the systemd name: each *os.File owns its own.
		fd, err := unix.FcntlInt(set[0].Fd(), unix.F_DUPFD_CLOEXEC, 0)
		set[0].Close()
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, os.NewFile(uintptr(fd), appfile.SlotFDName("http", i)))
	}
	tb.Cleanup(func() {
		for _, f := range out {
			f.Close()
		}
	})
	return out, sockets.BoundAddr(out[0])
}

// BenchmarkRoundRobinFDs passes 100,000 connections through a round-robin
// dispatcher process with 2 workers and fails unless the dispatcher's fd
// count returns to what it was before; it reports the fd counts and the
// RSS before and after. It takes long enough to run once (ns/op is the
// whole run; ns/conn one connection's share).
func BenchmarkRoundRobinFDs(b *testing.B) {
	const total = 100000
	app := rrApp(b, 2)
	l, addr := tcpListener(b, "http")
	d := startDispatcherProc(b, app, []*os.File{l})
	d.waitLine(b, 20*time.Second, "all 2 workers ready")
	waitAnswer(b, addr)
	pid := d.cmd.Process.Pid
	fds0, rss0 := fdCount(b, pid), rssKB(b, pid)

	start := time.Now()
	var failed atomic.Int64
	var rss []int // after each quarter: growth that stops is the runtime's, not a leak
	for range 4 {
		var done atomic.Int64
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
				for done.Add(1) <= total/4 {
					if _, err := getWith(c, "http://"+addr+"/"); err != nil {
						failed.Add(1)
					}
				}
			})
		}
		wg.Wait()
		rss = append(rss, rssKB(b, pid))
	}
	took := time.Since(start)
	var fds1 int
	testsync.WaitFor(b, 10*time.Second, "fd count back to baseline", func() bool {
		fds1 = fdCount(b, pid)
		return fds1 <= fds0
	})
	rss1 := rssKB(b, pid)
	b.Logf("%d connections in %s (%.0f/s, %d failed): dispatcher fds %d before, %d after; RSS %d kB before, %v kB after each 25%%, %d kB at the end",
		total, took.Round(time.Millisecond), total/took.Seconds(), failed.Load(), fds0, fds1, rss0, rss, rss1)
	if failed.Load() > 0 {
		b.Errorf("%d of %d requests failed", failed.Load(), total)
	}
	b.ReportMetric(float64(fds0), "fds-before")
	b.ReportMetric(float64(fds1), "fds-after")
	b.ReportMetric(float64(rss0), "rss-kB-before")
	b.ReportMetric(float64(rss1), "rss-kB-after")
	b.ReportMetric(float64(took.Nanoseconds())/total, "ns/conn")
}
