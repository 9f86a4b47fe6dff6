package vmtests

import (
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// testMetrics (issue 18.1, 18.2): [metrics] listen becomes a socket unit
// of its own, APP-cohort-metrics.socket, that systemd binds and passes to
// the service. It survives `systemctl restart APP.service`: the same
// listening socket (inode) before and after, no probe refused while the
// dispatcher is replaced, and a scrape of the new dispatcher works. The
// stop drains first: /readyz answers 503 for drain_delay while the old
// dispatcher still runs, and TimeoutStopSec= has room for the drain.
func testMetrics(t *testing.T, c *Container) {
	const app = "vm-metrics"
	msock := app + "-cohort-metrics.socket"
	c.Watch(t, app+".socket", app+".service", msock)
	worker := "/usr/local/lib/cohort-vmtest/vm-metrics-worker"
	installHello(t, c, worker)
	port, mport := FreePort(t), FreePort(t)
	// [metrics] after [[listen]]: a table goes on to the next header.
	file := appFile(fmt.Sprintf("[%q]", worker), 2, lifeSettings+"drain_delay = \"2s\"\n", port) +
		fmt.Sprintf("[metrics]\nlisten = \"127.0.0.1:%d\"\n", mport)
	startApp(t, c, app, file)
	t.Cleanup(func() {
		c.Exec(t, "systemctl", "stop", app+".socket", msock, app+".service")
		c.Exec(t, "rm", "-f", "/etc/cohort/"+app+".toml")
		c.Exec(t, "systemctl", "daemon-reload")
	})
	waitWorkersReady(t, c, app, 2, 30*time.Second)
	if s := c.Property(t, msock, "ActiveState"); s != "active" {
		t.Fatalf("%s is %s", msock, s)
	}
	// stop_timeout 10s + drain_delay 2s + the generator's 10s margin.
	if got := c.Property(t, app+".service", "TimeoutStopUSec"); got != "22s" {
		t.Errorf("TimeoutStopUSec = %s, want 22s", got)
	}
	base := fmt.Sprintf("http://127.0.0.1:%d", mport)
	scrape := func() string {
		t.Helper()
		out := c.Run(t, "curl", "-fsS", "--max-time", "10", base+"/metrics")
		if !strings.Contains(out, `cohort_workers_ready{app="vm-metrics"} 2`) || !strings.Contains(out, `cohort_listener_queue_limit{app="vm-metrics",listener="http"}`) {
			t.Errorf("scrape:\n%s", out)
		}
		return out
	}
	startRE := regexp.MustCompile(`(?m)^cohort_start_time_seconds\{app="vm-metrics"\} (\S+)$`)
	first := startRE.FindStringSubmatch(scrape())
	inode := func() string {
		t.Helper()
		m := regexp.MustCompile(`ino:(\d+)`).FindStringSubmatch(c.Run(t, "ss", "-Hltne", fmt.Sprintf("sport = :%d", mport)))
		if m == nil {
			t.Fatalf("no listening socket on %d", mport)
		}
		return m[1]
	}
	before, pid := inode(), mainPID(t, c, app)

	// Probe /readyz from the host every 50ms through the restart.
	var (
		mu      sync.Mutex
		codes   []string
		refused int
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			resp, err := client.Get(base + "/readyz")
			mu.Lock()
			switch {
			case err != nil && strings.Contains(err.Error(), "refused"):
				refused++
			case err != nil:
				codes = append(codes, "error")
			default:
				resp.Body.Close()
				if n := len(codes); n == 0 || codes[n-1] != fmt.Sprint(resp.StatusCode) {
					codes = append(codes, fmt.Sprint(resp.StatusCode))
				}
			}
			mu.Unlock()
		}
	})
	Eventually(t, 10*time.Second, "a first /readyz answer", func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(codes) == 0 {
			return fmt.Errorf("none yet")
		}
		return nil
	})
	start := time.Now()
	c.Run(t, "systemctl", "restart", app+".service")
	took := time.Since(start)
	waitWorkersReady(t, c, app, 2, 30*time.Second)
	Eventually(t, 20*time.Second, "/readyz 200 again", func() error {
		mu.Lock()
		defer mu.Unlock()
		if n := len(codes); n == 0 || codes[n-1] != "200" {
			return fmt.Errorf("readyz answers %v", codes)
		}
		return nil
	})
	close(stop)
	wg.Wait()
	t.Logf("systemctl restart %s took %s; /readyz answered %v, refused %d times", app, took.Round(time.Millisecond), codes, refused)
	if refused != 0 {
		t.Errorf("the metrics socket refused %d probes during the restart: systemd should hold it", refused)
	}
	if strings.Join(codes, ",") != "200,503,200" {
		t.Errorf("/readyz answered %v through the restart; want 200, then 503 (the drain), then 200", codes)
	}
	if took < 2*time.Second {
		t.Errorf("the restart took %s, less than drain_delay 2s", took)
	}
	if after := inode(); after != before {
		t.Errorf("metrics socket inode %s → %s: systemd did not keep it", before, after)
	}
	if now := mainPID(t, c, app); now == pid {
		t.Errorf("MainPID still %d: not restarted", pid)
	}
	second := startRE.FindStringSubmatch(scrape())
	if first == nil || second == nil || first[1] == second[1] {
		t.Errorf("dispatcher start time %v → %v: the scrape after the restart is not the new dispatcher's", first, second)
	}
	if j := c.Journal(t, "-u", app+".service", "-o", "cat"); !strings.Contains(j, "draining (") {
		t.Errorf("journal of %s has no drain:\n%s", app, j)
	}
}
