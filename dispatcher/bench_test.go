package dispatcher

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// BenchmarkSpawnToReady measures how long a restarted worker takes from
// fork to ready: through the trampoline to a Go program's READY=1
// (notify), and to exec of a program (exec).
func BenchmarkSpawnToReady(b *testing.B) {
	for _, tc := range []struct {
		name  string
		ready appfile.ReadyKind
	}{{"notify-go-worker", appfile.ReadyNotify}, {"exec-sleep", appfile.ReadyExec}} {
		b.Run(tc.name, func(b *testing.B) {
			app := testApp(b, 1, map[string]string{"HELPER_READY": "1"})
			if tc.ready == appfile.ReadyExec {
				app.Command = []string{"/bin/sleep", "60"}
			}
			app.Ready = appfile.Readiness{Kind: tc.ready}
			app.Restart = appfile.Restart{Initial: time.Millisecond, Max: time.Millisecond, MinUptime: time.Hour}
			l, _ := tcpListener(b, "http")
			rec, _ := startRun(b, Options{App: app, Listeners: []*os.File{l}})
			from := 0
			var total time.Duration
			b.ResetTimer()
			for range b.N {
				st := rec.wait(b, &from, 20*time.Second, "start", func(e Event) bool { return e.Kind == WorkerStarted })
				r := rec.wait(b, &from, 20*time.Second, "ready", func(e Event) bool { return e.Kind == WorkerReady && e.PID == st.PID })
				total += r.Time.Sub(st.Time)
				syscall.Kill(r.PID, syscall.SIGKILL)
			}
			b.StopTimer()
			b.ReportMetric(float64(total.Microseconds())/float64(b.N)/1000, "ms/spawn-to-ready")
		})
	}
}

// BenchmarkSharedMode runs the same Go worker alone and under a
// dispatcher process in shared mode (1 and 2 workers), puts each under the
// same keep-alive load in interleaved rounds (the machine may be busy with
// other work: interleaving spreads that noise evenly), and reports
// requests per second, the ratios to "alone", and the CPU time the
// dispatcher used meanwhile. Then ns/op is one keep-alive request through
// the 2-worker dispatcher.
func BenchmarkSharedMode(b *testing.B) {
	const (
		rounds = 3
		dur    = time.Second
		conns  = 8
	)
	// Alone: the worker socket-activated by the test, as systemd would.
	l, addr := tcpListener(b, "http")
	alone := startActivated(b, []string{"COHORT_TEST_HELPER=worker"}, []*os.File{l})
	targets := []*benchTarget{{name: "alone", addr: addr}}
	for _, n := range []int{1, 2} {
		app := testApp(b, n, map[string]string{"HELPER_READY": "1"})
		app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
		l, addr := tcpListener(b, "http")
		d := startDispatcherProc(b, app, []*os.File{l})
		d.waitLine(b, 20*time.Second, fmt.Sprintf("all %d workers ready", n))
		targets = append(targets, &benchTarget{name: fmt.Sprintf("cohort%d", n), addr: addr, pid: d.cmd.Process.Pid})
	}
	measureRounds(b, targets, rounds, func(addr string) float64 { return load(addr, conns, dur, true) })
	a, c1, c2 := targets[0], targets[1], targets[2]
	loadTime := rounds * dur
	b.Logf("%d conns keep-alive, %d rounds of %s: alone %.0f req/s; shared 1 worker %.0f req/s (%.2fx), 2 workers %.0f req/s (%.2fx); dispatcher CPU %s (1 worker) and %s (2 workers) in %s of load (%.4f%% of a core)",
		conns, rounds, dur, a.rps, c1.rps, c1.rps/a.rps, c2.rps, c2.rps/a.rps, c1.cpu, c2.cpu, loadTime, 100*c2.cpu.Seconds()/loadTime.Seconds())

	c := &http.Client{Timeout: 5 * time.Second}
	defer c.CloseIdleConnections()
	for b.Loop() {
		resp, err := c.Get("http://" + c2.addr + "/")
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	b.StopTimer()
	// After b.Loop: it resets the timer, which drops reported metrics.
	b.ReportMetric(a.rps, "alone-req/s")
	b.ReportMetric(c1.rps, "cohort1-req/s")
	b.ReportMetric(c2.rps, "cohort2-req/s")
	b.ReportMetric(c1.rps/a.rps, "cohort1/alone")
	b.ReportMetric(c2.rps/a.rps, "cohort2/alone")
	b.ReportMetric(float64(c2.cpu.Microseconds())/1000, "dispatcher-cpu-ms")
	b.ReportMetric(100*c2.cpu.Seconds()/loadTime.Seconds(), "dispatcher-cpu-%")
	_ = alone
}

// benchTarget is one server a benchmark puts under load: the worker
// alone, or a dispatcher process (pid) with its workers.
type benchTarget struct {
	name string
	addr string
	pid  int // the dispatcher, or 0
	rps  float64
	cpu  time.Duration // the dispatcher's CPU time under load
}

// measureRounds waits until every target answers, then loads them in
// turn, rounds times (the machine may be busy with other work:
// interleaving spreads that noise evenly), averaging the requests per
// second that run returns and summing the dispatchers' CPU time.
func measureRounds(b testing.TB, targets []*benchTarget, rounds int, run func(addr string) float64) {
	for _, t := range targets {
		waitAnswer(b, t.addr)
	}
	for range rounds {
		for _, t := range targets {
			var before time.Duration
			if t.pid != 0 {
				before = procCPU(b, t.pid)
			}
			t.rps += run(t.addr) / float64(rounds)
			if t.pid != 0 {
				t.cpu += procCPU(b, t.pid) - before
			}
		}
	}
}

// waitAnswer waits until addr answers HTTP.
func waitAnswer(b testing.TB, addr string) {
	testsync.WaitFor(b, 20*time.Second, "first answer from "+addr, func() bool {
		_, err := get("http://" + addr + "/")
		return err == nil
	})
}

// load runs clients against addr for dur and returns the requests per
// second answered: with keepAlive each client reuses its connection, else
// every request opens a new one (HTTP Connection: close).
func load(addr string, clients int, dur time.Duration, keepAlive bool) float64 {
	var ok atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(dur)
	for range clients {
		wg.Go(func() {
			tr := &http.Transport{MaxIdleConnsPerHost: 1, DisableKeepAlives: !keepAlive}
			c := &http.Client{Timeout: 5 * time.Second, Transport: tr}
			defer c.CloseIdleConnections()
			for time.Now().Before(deadline) {
				resp, err := c.Get("http://" + addr + "/")
				if err != nil {
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 {
					ok.Add(1)
				}
			}
		})
	}
	wg.Wait()
	return float64(ok.Load()) / time.Since(start).Seconds()
}

// procCPU is the CPU time pid's threads have used, from schedstat (ns).
func procCPU(b testing.TB, pid int) time.Duration {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		b.Fatal(err)
	}
	var total int64
	for _, e := range ents {
		s, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, e.Name()))
		if err != nil {
			continue
		}
		f := strings.Fields(string(s))
		if len(f) > 0 {
			n, _ := strconv.ParseInt(f[0], 10, 64)
			total += n
		}
	}
	return time.Duration(total)
}

// BenchmarkScrape measures /metrics of a dispatcher process with 16
// workers: the time one scrape takes and the dispatcher's CPU per
// scrape, against the CPU it uses idle over the same wall time, in
// interleaved rounds of the same run (the machine may be busy). ns/op
// is one scrape.
func BenchmarkScrape(b *testing.B) {
	const (
		workers = 16
		rounds  = 3
		dur     = 2 * time.Second
	)
	app := testApp(b, workers, nil)
	app.Command = []string{"/bin/sleep", "600"}
	app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
	app.Metrics.Listen = appfile.Listener{Name: appfile.MetricsFDName, Address: "127.0.0.1:0", Kind: appfile.ListenTCP}
	l, _ := tcpListener(b, "http")
	m, maddr := tcpListener(b, appfile.MetricsFDName)
	d := startDispatcherProc(b, app, []*os.File{l, m})
	d.waitLine(b, 30*time.Second, fmt.Sprintf("all %d workers ready", workers))
	pid := d.cmd.Process.Pid
	c := &http.Client{Timeout: 10 * time.Second}
	defer c.CloseIdleConnections()
	get := func(url string) {
		resp, err := c.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("%s: %d", url, resp.StatusCode)
		}
	}
	scrape := func() { get("http://" + maddr + "/metrics") }
	scrape()
	var idleCPU, scrapeCPU, scrapeWall, readyCPU time.Duration
	var n, probes int
	for range rounds {
		before := procCPU(b, pid)
		time.Sleep(dur)
		idleCPU += procCPU(b, pid) - before

		before = procCPU(b, pid)
		start := time.Now()
		for time.Since(start) < dur {
			scrape()
			n++
		}
		scrapeWall += time.Since(start)
		scrapeCPU += procCPU(b, pid) - before

		before = procCPU(b, pid)
		start = time.Now()
		for time.Since(start) < dur {
			get("http://" + maddr + "/readyz")
			probes++
		}
		readyCPU += procCPU(b, pid) - before
	}
	perScrape := (scrapeCPU - idleCPU) / time.Duration(n)
	perProbe := (readyCPU - idleCPU) / time.Duration(probes)
	b.Logf("/readyz: %d probes, dispatcher CPU %.3f ms per probe (the loop's snapshot, no /proc)", probes, float64(perProbe.Microseconds())/1000)
	b.Logf("%d workers, %d rounds of %s: %d scrapes, %.2f ms each; dispatcher CPU %s scraping vs %s idle in the same wall time (%.1fx): %.2f ms CPU per scrape",
		workers, rounds, dur, n, float64(scrapeWall.Microseconds())/float64(n)/1000, scrapeCPU, idleCPU,
		float64(scrapeCPU)/float64(max(idleCPU, time.Microsecond)), float64(perScrape.Microseconds())/1000)
	for b.Loop() {
		scrape()
	}
	b.StopTimer()
	b.ReportMetric(float64(scrapeWall.Microseconds())/float64(n)/1000, "ms/scrape")
	b.ReportMetric(float64(perScrape.Microseconds())/1000, "dispatcher-cpu-ms/scrape")
	b.ReportMetric(float64(scrapeCPU)/float64(max(idleCPU, time.Microsecond)), "cpu-scraping/idle")
	b.ReportMetric(float64(perProbe.Microseconds())/1000, "dispatcher-cpu-ms/readyz")
}
