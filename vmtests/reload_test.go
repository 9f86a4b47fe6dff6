package vmtests

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// helloBin builds examples/hello once per test process (static, so it
// runs in any release's root) in a private directory, and returns the
// binary's bytes.
var helloBin = sync.OnceValues(func() ([]byte, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "cohort-vmtest-hello-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "cohort-hello")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./examples/hello")
	cmd.Dir = root
	cmd.Env = append(cmd.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build ./examples/hello: %v\n%s", err, b)
	}
	return os.ReadFile(out)
})

// statusJSON is what the scenario reads of `cohort status --json`.
type statusJSON struct {
	Generation int    `json:"generation"`
	State      string `json:"state"`
	Line       string `json:"line"`
	Workers    []struct {
		Index      int    `json:"index"`
		PID        int    `json:"pid"`
		Generation int    `json:"generation"`
		State      string `json:"state"`
	} `json:"workers"`
}

// testReload: `systemctl reload` under systemd is a rolling restart that
// drops nothing and returns when it has finished; a reload whose new
// command fails makes `systemctl reload` fail while the old workers keep
// serving; each worker's lines can be picked out of the journal by
// COHORT_WORKER; `cohort status` and `cohort list` work inside.
func testReload(t *testing.T, c *Container) {
	const app = "rolling"
	c.Watch(t, app+".socket", app+".service")
	installHello(t, c, "/usr/local/lib/cohort-vmtest/cohort-hello")
	port := FreePort(t)
	toml := func(command string) []byte {
		return []byte(appFile("["+command+"]", 4, lifeSettings, port))
	}
	c.WriteFile(t, "/etc/cohort/"+app+".toml", toml(`"/usr/local/lib/cohort-vmtest/cohort-hello"`), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	if units := c.Run(t, "systemctl", "cat", app+".service"); !strings.Contains(units, "ExecReload=+/usr/bin/cohort dispatch-reload /etc/cohort/"+app+".toml") {
		t.Fatalf("no ExecReload= running dispatch-reload:\n%s", units)
	}
	c.Run(t, "systemctl", "start", app+".socket", app+".service")
	c.WaitJournal(t, 20*time.Second, "all 4 workers ready", "-u", app+".service")

	status := func() statusJSON {
		t.Helper()
		var st statusJSON
		out := c.Run(t, "cohort", "status", "--json", app)
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("cohort status --json: %v\n%s", err, out)
		}
		return st
	}
	before := status()
	if before.Generation != 1 || len(before.Workers) != 4 {
		t.Fatalf("before the reload: %+v", before)
	}

	// reloadUnderLoad runs `systemctl reload` while a bounded load runs,
	// and returns its result and the load's.
	reloadUnderLoad := func() (Result, LoadResult) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		loadCtx, stopLoad := context.WithCancel(ctx)
		defer stopLoad()
		type loadOut struct {
			res LoadResult
			err error
		}
		done := make(chan loadOut, 1)
		go func() {
			res, err := Load(loadCtx, LoadOptions{
				URL:      fmt.Sprintf("http://127.0.0.1:%d/", port),
				Requests: 200000, Duration: 60 * time.Second, Concurrency: 8, Timeout: 10 * time.Second,
			})
			done <- loadOut{res, err}
		}()
		time.Sleep(300 * time.Millisecond) // let the load get under way (not a sync point)
		start := time.Now()
		res, err := c.ExecContext(ctx, "systemctl", "reload", app)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("systemctl reload %s: exit %d after %v %s", app, res.Code, time.Since(start).Round(time.Millisecond), strings.TrimSpace(res.Stderr))
		time.Sleep(300 * time.Millisecond) // and keep it going past the reload
		stopLoad()
		out := <-done
		if out.err != nil && ctx.Err() != nil {
			t.Fatalf("load: %v", out.err)
		}
		t.Logf("load through the reload: %v", out.res)
		return res, out.res
	}

	// 1. A successful rolling reload.
	res, ld := reloadUnderLoad()
	if res.Code != 0 {
		t.Errorf("systemctl reload: %s", res)
	}
	if ld.OK == 0 || ld.Failed() != 0 {
		t.Errorf("load through the reload: %v; want 0 errors and 0 non-2xx", ld)
	}
	after := status()
	if after.Generation != 2 || len(after.Workers) != 4 {
		t.Errorf("after the reload: %+v", after)
	}
	for i, w := range after.Workers {
		if w.Generation != 2 || w.State != "ready" || w.PID == before.Workers[i].PID {
			t.Errorf("worker %d after the reload: %+v", i, w)
		}
	}
	if state := c.Property(t, app+".service", "ActiveState") + "/" + c.Property(t, app+".service", "SubState"); state != "active/running" {
		t.Errorf("%s.service is %s after the reload", app, state)
	}

	// 2. A reload whose new command exits 1: systemctl reload fails, the
	// old workers keep serving, STATUS= says why.
	c.WriteFile(t, "/etc/cohort/"+app+".toml", toml(`"/bin/sh", "-c", "exit 1"`), 0o644)
	res, ld = reloadUnderLoad()
	if res.Code == 0 {
		t.Errorf("systemctl reload with a failing command exited 0")
	}
	if ld.OK == 0 || ld.Failed() != 0 {
		t.Errorf("load through the failed reload: %v; want 0 errors and 0 non-2xx", ld)
	}
	failed := status()
	for i, w := range failed.Workers {
		if w.PID != after.Workers[i].PID || w.State != "ready" {
			t.Errorf("worker %d after the failed reload: %+v, want pid %d still ready", i, w, after.Workers[i].PID)
		}
	}
	if text := c.Property(t, app+".service", "StatusText"); !strings.Contains(text, "reload failed") || !strings.Contains(text, "exited with status 1") {
		t.Errorf("StatusText after the failed reload: %q", text)
	}
	if state := c.Property(t, app+".service", "ActiveState"); state != "active" {
		t.Errorf("%s.service is %s after the failed reload; want active", app, state)
	}
	c.WaitJournal(t, 10*time.Second, "reload failed, old workers keep serving", "-u", app+".service")

	// 3. Journal attribution: worker 1's lines only.
	lines := strings.TrimSpace(c.Journal(t, "-u", app+".service", "COHORT_WORKER=1", "-o", "cat"))
	if lines == "" {
		t.Errorf("journalctl -u %s COHORT_WORKER=1 shows nothing", app)
	}
	for _, l := range strings.Split(lines, "\n") {
		if !strings.HasPrefix(l, "worker 1 ") {
			t.Errorf("journalctl -u %s COHORT_WORKER=1 shows a line that is not worker 1's: %q", app, l)
		}
	}
	gen2 := false
	for _, l := range strings.Split(strings.TrimSpace(c.Journal(t, "-u", app+".service", "COHORT_WORKER=1", "-o", "json")), "\n") {
		var e map[string]any
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatalf("journalctl -o json: %v: %s", err, l)
		}
		if e["COHORT_WORKER"] != "1" || e["COHORT_APP"] != app || e["COHORT_PID"] != e["SYSLOG_PID"] || e["COHORT_PID"] == nil {
			t.Errorf("worker 1's journal entry: %v", e)
		}
		gen2 = gen2 || e["COHORT_GENERATION"] == "2"
	}
	if !gen2 {
		t.Errorf("no journal entry of worker 1 of generation 2")
	}

	// 4. The CLI inside the container: cohort reload (over D-Bus, so
	// through systemd and ExecReload=), status, list.
	c.WriteFile(t, "/etc/cohort/"+app+".toml", toml(`"/usr/local/lib/cohort-vmtest/cohort-hello"`), 0o644)
	if out := c.Run(t, "cohort", "reload", app); !strings.Contains(out, app+".service reloaded") {
		t.Errorf("cohort reload %s: %q", app, out)
	}
	table := c.Run(t, "cohort", "status", app)
	if !strings.HasPrefix(table, app+": 4/4 workers ready · gen 3 · shared · 0 restarts\n") || !strings.Contains(table, "WORKER  PID") {
		t.Errorf("cohort status %s:\n%s", app, table)
	}
	list := c.Run(t, "cohort", "list")
	if !regexp.MustCompile(`(?m)^` + app + `\s+active/running\s+active/running\s+\d+\s+/etc/cohort/` + app + `\.toml$`).MatchString(list) {
		t.Errorf("cohort list:\n%s", list)
	}
	t.Logf("cohort status %s:\n%s\ncohort list:\n%s", app, table, list)
	c.Run(t, "systemctl", "stop", app+".socket", app+".service")
}
