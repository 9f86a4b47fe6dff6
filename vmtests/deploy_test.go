package vmtests

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// testDeploy: the broken deploy of issue 13 under a real systemd. A Node
// app in shared mode with the default readiness (no ready key: ready =
// "listening"), under DynamicUser and the default hardening, with load
// running throughout: `echo "const x = ;" >> server.js; systemctl reload`
// fails (and so does `cohort reload`), the old workers keep serving, a
// good reload then succeeds, and no request fails. Then the reload stall
// (the slowest answer during a reload) of the same Node app under the
// default readiness and under ready = "exec", and of the Python example
// under "notify" and "listening", all in the same run.
func testDeploy(t *testing.T, c *Container) {
	const app = "deploy"
	c.Watch(t, app+".socket", app+".service")
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	const dir = "/usr/local/lib/cohort-vmtest/deploy"
	js := dir + "/server.js"
	c.CopyFile(t, filepath.Join(root, "examples", "node", "server.js"), js, 0o644)
	c.CopyFile(t, filepath.Join(root, "examples", "python", "shared_worker.py"), dir+"/shared_worker.py", 0o644)
	port := FreePort(t)
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	toml := func(command, ready string) []byte {
		return fmt.Appendf(nil, `command = %s
workers = 2
mode = "shared"
%s
[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, command, ready, port)
	}
	nodeCmd := fmt.Sprintf(`["/usr/bin/node", %q]`, js)
	c.WriteFile(t, "/etc/cohort/"+app+".toml", toml(nodeCmd, ""), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	c.Run(t, "systemctl", "start", app+".socket")
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	if body, code, err := fetch(client, url); err != nil || code != 200 || !strings.Contains(body, "gen 1") {
		t.Fatalf("first request through %s.socket: %d %q %v", app, code, body, err)
	}
	c.WaitJournal(t, 30*time.Second, "all 2 workers ready", "-u", app+".service")
	if j := c.Journal(t, "-u", app+".service"); !strings.Contains(j, "ready=listening") || !strings.Contains(j, "accepts (") {
		t.Fatalf("the dispatcher did not use ready = \"listening\" by default:\n%s", tail(j, 30))
	}
	st := cohortStatus(t, c, app)
	oldPIDs := map[int]bool{}
	for _, w := range st.Workers {
		oldPIDs[w.PID] = true
	}

	load := StartLoad(t, LoadOptions{URL: url, Requests: 1_000_000, Duration: 4 * time.Minute, Concurrency: 4})
	load.WaitOK(t, 200, 30*time.Second)

	// The broken deploy.
	c.Sh(t, `echo "const x = ;" >> `+js)
	res := c.Exec(t, "systemctl", "reload", app)
	if res.Code == 0 {
		t.Errorf("systemctl reload onto a server.js with a syntax error exited 0; want it to fail")
	}
	t.Logf("broken deploy: systemctl reload exit %d: %s", res.Code, strings.TrimSpace(res.Stderr))
	res = c.Exec(t, "cohort", "reload", app)
	if res.Code == 0 {
		t.Errorf("cohort reload onto a server.js with a syntax error exited 0; want it to fail")
	}
	t.Logf("broken deploy: cohort reload exit %d: %s", res.Code, strings.TrimSpace(res.Stderr))
	st = cohortStatus(t, c, app)
	for _, w := range st.Workers {
		if !oldPIDs[w.PID] || w.State != "ready" || w.Generation != 1 {
			t.Errorf("after the broken deploy: worker %d pid %d gen %d %s; want an old worker, ready", w.Index, w.PID, w.Generation, w.State)
		}
	}
	load.WaitOK(t, 200, 30*time.Second)
	if body, code, err := fetch(client, url); err != nil || code != 200 || !strings.Contains(body, "gen 1") {
		t.Errorf("after the broken deploy: %d %q %v; want generation 1 serving", code, body, err)
	}

	// The fix.
	c.CopyFile(t, filepath.Join(root, "examples", "node", "server.js"), js, 0o644)
	c.Run(t, "systemctl", "reload", app)
	load.WaitOK(t, 200, 30*time.Second)
	if body, code, err := fetch(client, url); err != nil || code != 200 || !strings.Contains(body, "gen 2") {
		t.Errorf("after the good reload: %d %q %v; want generation 2 serving", code, body, err)
	}
	lr, kinds := load.Stop()
	t.Logf("%s: broken deploy then good reload under load: %d failed of %d (%s)", c.Release.Name, lr.Failed(), lr.Sent, kinds)
	if lr.Failed() != 0 {
		t.Errorf("%d of %d requests failed (%s): %s", lr.Failed(), lr.Sent, kinds, lr)
	}
	checkSystemdHolds(t, c, port)

	// The reload stall, readiness by readiness. Each readiness is put in
	// place by one reload (which starts its workers with it) and measured
	// on the next.
	pyCmd := fmt.Sprintf(`["/usr/bin/python3", %q]`, dir+"/shared_worker.py")
	var report []string
	// The noise floor: the same clients for 5 s with no reload.
	base := measureStall(t, url, func() { time.Sleep(5 * time.Second) })
	report = append(report, fmt.Sprintf("%s: no reload (baseline, 5 s): slowest %s (median %s), %d failed of %d",
		c.Release.Name, base.slowest.Round(time.Millisecond), base.median.Round(time.Millisecond), base.failed, base.sent))
	t.Log(report[0])
	for _, m := range []struct{ name, command, ready string }{
		{"node listening (default)", nodeCmd, ""},
		{"node exec", nodeCmd, `ready = "exec"`},
		{"node listening (default), again", nodeCmd, ""},
		{"python notify", pyCmd, `ready = "notify"`},
		{"python listening (default)", pyCmd, ""},
	} {
		c.WriteFile(t, "/etc/cohort/"+app+".toml", toml(m.command, m.ready), 0o644)
		c.Run(t, "systemctl", "reload", app)
		s := reloadStall(t, c, app, url)
		line := fmt.Sprintf("%s: %s: reload stall %s (median %s), %d failed of %d, reload took %s",
			c.Release.Name, m.name, s.slowest.Round(time.Millisecond), s.median.Round(time.Millisecond), s.failed, s.sent, s.took.Round(time.Millisecond))
		t.Log(line)
		report = append(report, line)
		if s.failed != 0 {
			t.Errorf("%s: %d of %d requests failed during the reload: %v", m.name, s.failed, s.sent, s.firstErr)
		}
	}
	t.Logf("reload stall summary:\n%s", strings.Join(report, "\n"))
	checkSystemdHolds(t, c, port)
	c.Run(t, "systemctl", "stop", app+".socket", app+".service")
}

// stall is what reloadStall measured.
type stall struct {
	slowest, median, took time.Duration
	sent, failed          int
	firstErr              error
}

// reloadStall runs `systemctl reload app` while two clients send requests
// one after another (a new connection each), and measures the requests
// sent while the reload ran: the slowest answer is the stall a client
// saw. The clients stop when the reload has returned (bounded by its own
// timeout).
func reloadStall(t *testing.T, c *Container, app, url string) stall {
	t.Helper()
	var res Result
	s := measureStall(t, url, func() { res = c.Exec(t, "systemctl", "reload", app) })
	if res.Code != 0 {
		t.Errorf("systemctl reload %s: %s", app, res)
	}
	return s
}

// measureStall runs action while two clients send requests one after
// another, and measures the requests sent meanwhile.
func measureStall(t *testing.T, url string, action func()) stall {
	t.Helper()
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	var (
		mu   sync.Mutex
		lat  []time.Duration
		s    stall
		stop = make(chan struct{})
		wg   sync.WaitGroup
	)
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				t0 := time.Now()
				_, code, err := fetch(client, url)
				d := time.Since(t0)
				mu.Lock()
				s.sent++
				lat = append(lat, d)
				if err == nil && code != 200 {
					err = fmt.Errorf("status %d", code)
				}
				if err != nil {
					s.failed++
					if s.firstErr == nil {
						s.firstErr = err
					}
				}
				mu.Unlock()
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
	t0 := time.Now()
	action()
	s.took = time.Since(t0)
	close(stop)
	wg.Wait()
	for _, d := range lat {
		s.slowest = max(s.slowest, d)
	}
	if len(lat) > 0 {
		slices.Sort(lat)
		s.median = lat[len(lat)/2]
	}
	return s
}

// cohortStatus is `cohort status --json APP` inside the container.
func cohortStatus(t *testing.T, c *Container, app string) statusJSON {
	t.Helper()
	var st statusJSON
	out := c.Run(t, "cohort", "status", "--json", app)
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("cohort status --json %s: %v\n%s", app, err, out)
	}
	return st
}

// checkSystemdHolds checks with ss that pid 1 (systemd) still holds the
// listening socket on port.
func checkSystemdHolds(t *testing.T, c *Container, port int) {
	t.Helper()
	out := c.Run(t, "ss", "-Hltnp", fmt.Sprintf("sport = :%d", port))
	if !strings.Contains(out, "pid=1,") {
		t.Errorf("systemd (pid 1) does not hold port %d:\n%s", port, out)
	}
}
