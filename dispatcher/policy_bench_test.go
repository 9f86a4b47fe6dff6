package dispatcher

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
)

// BenchmarkPoliciesSlowWorker compares the balance policies with 3
// workers of which worker 0 answers 10x slower (20 ms against 2 ms,
// "/work"): 16 clients send 900 requests on new connections per policy,
// and it logs, per policy, the share of requests and the mean open
// connections of each worker (the time its requests were open over the
// run's, Little's law) and p50/p99
// latency, as a markdown table (docs/config.md, Modes). weighted uses
// weights = [1, 10, 10]. It runs once (ns/op is the whole run).
func BenchmarkPoliciesSlowWorker(b *testing.B) {
	const (
		workers  = 3
		requests = 3000
		clients  = 16
	)
	type result struct {
		name     string
		share    [workers]float64
		open     [workers]float64
		p50, p99 time.Duration
	}
	var results []result
	for _, policy := range []string{appfile.BalanceRoundRobin, appfile.BalanceLeastConnections, appfile.BalanceP2C, appfile.BalanceWeighted} {
		app := rrApp(b, workers)
		app.Environment["HELPER_SLOW_WORKER"] = "0"
		app.Balance = policy
		if policy == appfile.BalanceWeighted {
			app.Weights = []int{1, 10, 10}
		}
		l, addr := tcpListener(b, "http")
		dir := b.TempDir()
		rec, stop := startRun(b, Options{App: app, Listeners: []*os.File{l}, RuntimeDir: dir})
		rec.waitNotify(b, 20*time.Second, "READY=1")
		sock := filepath.Join(dir, control.SocketName)
		waitSpoken(b, addr, sock, workers)

		var (
			mu     sync.Mutex
			lat    []time.Duration
			counts [workers]int
			next   = make(chan struct{}, requests)
			busy   [workers]time.Duration // time its requests were open
		)
		for range requests {
			next <- struct{}{}
		}
		close(next)
		start := time.Now()
		var load sync.WaitGroup
		for range clients {
			load.Go(func() {
				c := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
				for range next {
					t0 := time.Now()
					body, err := getWith(c, "http://"+addr+"/work?ms=2")
					if err != nil {
						b.Error(err)
						return
					}
					d := time.Since(t0)
					var w int
					fmt.Sscan(workerOf(body), &w)
					mu.Lock()
					lat = append(lat, d)
					if w >= 0 && w < workers {
						counts[w]++
						busy[w] += d
					}
					mu.Unlock()
				}
			})
		}
		load.Wait()
		wall := time.Since(start)
		stop()
		slices.Sort(lat)
		r := result{name: policy, p50: lat[len(lat)/2], p99: lat[len(lat)*99/100]}
		for i := range workers {
			r.share[i] = float64(counts[i]) / float64(len(lat))
			r.open[i] = busy[i].Seconds() / wall.Seconds() // Little's law: mean open connections
		}
		results = append(results, r)
	}
	var t strings.Builder
	t.WriteString("| balance | requests 0 (slow) / 1 / 2 | mean open 0 (slow) / 1 / 2 | p50 | p99 |\n|---|---|---|--:|--:|\n")
	for _, r := range results {
		fmt.Fprintf(&t, "| %s | %.0f %% / %.0f %% / %.0f %% | %.1f / %.1f / %.1f | %v | %v |\n", r.name,
			100*r.share[0], 100*r.share[1], 100*r.share[2], r.open[0], r.open[1], r.open[2],
			r.p50.Round(100*time.Microsecond), r.p99.Round(100*time.Microsecond))
	}
	b.Logf("3 workers, worker 0 10x slower (20 ms vs 2 ms), %d clients, %d requests per policy, new connection each:\n%s", clients, requests, t.String())
	for b.Loop() {
	}
}
