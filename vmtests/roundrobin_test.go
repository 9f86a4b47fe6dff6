package vmtests

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// buildHello builds examples/hello from this tree (static, so that it
// runs on every release's libc) into a temporary directory of t and
// returns its path on the host.
func buildHello(t *testing.T) string {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "cohort-hello")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := hostRun(ctx, root, "env", "CGO_ENABLED=0", "go", "build", "-trimpath", "-o", out, "./examples/hello"); err != nil {
		t.Fatalf("build examples/hello: %v", err)
	}
	return out
}

// testRoundRobin: an app in round-robin mode behind socket activation.
// The Go example (the same binary as in shared mode) runs as 2 workers;
// the dispatcher accepts every connection and hands it over, so requests
// spread evenly over both, and systemctl status shows the mode in the
// dispatcher's STATUS= line.
func testRoundRobin(t *testing.T, c *Container) {
	bin := buildHello(t)
	c.Watch(t, "rr.socket", "rr.service")
	port := FreePort(t)
	c.CopyFile(t, bin, "/usr/local/lib/cohort-vmtest/cohort-hello", 0o755)
	c.WriteFile(t, "/etc/cohort/rr.toml", []byte(fmt.Sprintf(`command = ["/usr/local/lib/cohort-vmtest/cohort-hello"]
workers = 2
mode = "round-robin"
ready = "notify"
max_pending = 16

[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, port)), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	c.Run(t, "systemctl", "start", "rr.socket")

	// The first request starts rr.service; systemd holds the connection
	// in the socket's backlog until the dispatcher hands it to a worker.
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	if _, failed, first := spreadRequests(url, 1, 1); failed > 0 {
		t.Fatalf("first request through rr.socket: %v", first)
	}
	const want = "2/2 workers ready · gen 1 · round-robin · 0 restarts"
	Eventually(t, 20*time.Second, "both workers ready", func() error {
		if got := c.Property(t, "rr.service", "StatusText"); got != want {
			return fmt.Errorf("rr.service StatusText=%q; want %q", got, want)
		}
		return nil
	})

	const n = 400
	counts, failed, first := spreadRequests(url, n, 4)
	t.Logf("%d requests over 2 round-robin workers: %v, %d failed", n, counts, failed)
	if failed > 0 {
		t.Errorf("%d of %d requests failed, first: %v", failed, n, first)
	}
	lo, hi := min(counts["0"], counts["1"]), max(counts["0"], counts["1"])
	if len(counts) != 2 || lo == 0 || float64(hi)/float64(lo) > 1.1 {
		t.Errorf("answers per worker %v; want both workers, max/min ≤ 1.1", counts)
	}
	// One client at a time: strictly in turn.
	more, failed, first := spreadRequests(url, 100, 1)
	if failed > 0 || more["0"] != 50 || more["1"] != 50 {
		t.Errorf("100 sequential requests: %v, %d failed (%v); want 50 per worker", more, failed, first)
	}

	status := c.Exec(t, "systemctl", "status", "--no-pager", "--full", "rr.service").Stdout
	if !strings.Contains(status, "Status: \""+want+"\"") {
		t.Errorf("systemctl status rr.service lacks the round-robin status line:\n%s", status)
	}
	c.WaitJournal(t, 10*time.Second, "round-robin mode", "-u", "rr.service")
	for _, w := range []string{"0", "1"} {
		c.WaitJournal(t, 10*time.Second, "worker "+w+" (pid", "-u", "rr.service")
	}
}

// spreadRequests sends n GET requests to url (a loopback address), each on
// a new connection, from conc clients, and counts the answers per worker
// from the body ("hello from worker N …").
func spreadRequests(url string, n, conc int) (counts map[string]int, failed int, first error) {
	if err := checkLoopback(url); err != nil {
		return nil, n, err
	}
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		jobs = make(chan struct{}, n)
	)
	counts = map[string]int{}
	for range n {
		jobs <- struct{}{}
	}
	close(jobs)
	for range conc {
		wg.Go(func() {
			c := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
			for range jobs {
				worker, err := helloWorker(c, url)
				mu.Lock()
				if err != nil {
					failed++
					if first == nil {
						first = err
					}
				} else {
					counts[worker]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return counts, failed, first
}

// helloWorker fetches url and returns the worker index the answer names.
func helloWorker(c *http.Client, url string) (string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	body := string(b)
	rest, ok := strings.CutPrefix(body, "hello from worker ")
	if resp.StatusCode != 200 || !ok || len(strings.Fields(rest)) == 0 {
		return "", fmt.Errorf("answer %s %q", resp.Status, body)
	}
	return strings.Fields(rest)[0], nil
}
