package vmtests

import (
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// testNode: the Node.js example (examples/node/server.js, plain
// server.listen({fd: 3})) under systemd in shared mode with Debian's
// nodejs, behind DynamicUser and the default hardening profile: 2 workers
// (ready = "exec"), and both answer with their COHORT_WORKER.
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

	// Shared mode: the kernel picks the worker, so ask until both have
	// answered (bounded: 400 requests or 30 s).
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	answer := regexp.MustCompile(`^hello from node worker (\d+) \(pid \d+, gen 1\)\n$`)
	counts := map[string]int{}
	sent, failed := 0, 0
	var firstErr error
	deadline := time.Now().Add(30 * time.Second)
	for (counts["0"] == 0 || counts["1"] == 0) && sent < 400 && time.Now().Before(deadline) {
		sent++
		body, code, err := fetch(client, url)
		m := answer.FindStringSubmatch(body)
		if err != nil || code != 200 || m == nil {
			failed++
			if firstErr == nil {
				firstErr = fmt.Errorf("answer %d %q: %v", code, body, err)
			}
			continue
		}
		counts[m[1]]++
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
	// Each worker's stdout is in the journal under its COHORT_WORKER.
	for _, w := range []string{"0", "1"} {
		c.WaitJournal(t, 10*time.Second, "node worker "+w+" (pid", "-u", app+".service", "COHORT_WORKER="+w)
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
