package vmtests

import (
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// testNode: the Node.js example (examples/node/server.js, plain
// server.listen({fd: 3})) under systemd in shared mode with Debian's
// nodejs, behind DynamicUser and the default hardening profile: 2 workers
// (ready = "exec"), each one's stdout is in the journal under its
// COHORT_WORKER, and both answer with it.
func testNode(t *testing.T, c *Container) {
	const app = "nodeweb"
	version := strings.TrimSpace(c.Run(t, "node", "--version"))
	t.Logf("%s: node %s", c.Release.Name, version)
	c.Watch(t, app+".socket", app+".service")
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	c.CopyFile(t, filepath.Join(root, "examples", "node", "server.js"), "/usr/local/lib/cohort-vmtest/server.js", 0o644)
	port := FreePort(t)
	c.WriteFile(t, "/etc/cohort/"+app+".toml", []byte(fmt.Sprintf(`command = ["/usr/bin/node", "/usr/local/lib/cohort-vmtest/server.js"]
workers = 2
mode = "shared"
ready = "exec"

[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, port)), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	c.Run(t, "systemctl", "start", app+".socket")

	// The first request starts the service through the socket. With
	// ready = "exec" a worker counts as ready when node starts, before
	// it listens; it logs "serving" once it does, so wait for both.
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	answer := regexp.MustCompile(`^hello from node worker (\d+) \(pid \d+, gen 1\)\n$`)
	if body, code, err := fetch(client, url); err != nil || code != 200 || answer.FindStringSubmatch(body) == nil {
		t.Fatalf("first request through %s.socket: %d %q %v", app, code, body, err)
	}
	for _, w := range []string{"0", "1"} {
		c.WaitJournal(t, 20*time.Second, "node worker "+w+" (pid", "-u", app+".service", "COHORT_WORKER="+w)
	}

	// Shared mode: the kernel picks the worker, and with one client at a
	// time it tends to pick the same one, so ask in rounds of 8 parallel
	// requests until both have answered (bounded: 50 rounds or 30 s).
	var (
		mu       sync.Mutex
		counts   = map[string]int{}
		sent     int
		failed   int
		firstErr error
	)
	deadline := time.Now().Add(30 * time.Second)
	for round := 0; (counts["0"] == 0 || counts["1"] == 0) && round < 50 && time.Now().Before(deadline); round++ {
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				body, code, err := fetch(client, url)
				m := answer.FindStringSubmatch(body)
				mu.Lock()
				defer mu.Unlock()
				sent++
				if err != nil || code != 200 || m == nil {
					failed++
					if firstErr == nil {
						firstErr = fmt.Errorf("answer %d %q: %v", code, body, err)
					}
					return
				}
				counts[m[1]]++
			})
		}
		wg.Wait()
	}
	t.Logf("%d requests: answers per COHORT_WORKER %v, %d failed", sent, counts, failed)
	if failed > 0 {
		t.Errorf("%d of %d requests to the Node.js app failed; first: %v", failed, sent, firstErr)
	}
	if len(counts) != 2 || counts["0"] == 0 || counts["1"] == 0 {
		t.Fatalf("answers per worker %v; want workers 0 and 1", counts)
	}

	if got := c.Property(t, app+".service", "StatusText"); !strings.HasPrefix(got, "2/2 workers ready · gen 1 · shared") {
		t.Errorf("%s.service StatusText=%q; want 2/2 workers ready in shared mode", app, got)
	}
	if got := c.Property(t, app+".service", "DynamicUser"); got != "yes" {
		t.Errorf("%s.service DynamicUser=%s; want yes", app, got)
	}
	c.Run(t, "systemctl", "stop", app+".socket", app+".service")
}

// fetch GETs url and returns the body and status code.
func fetch(c *http.Client, url string) (string, int, error) {
	if err := checkLoopback(url); err != nil {
		return "", 0, err
	}
	resp, err := c.Get(url)
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return string(b), resp.StatusCode, err
}
