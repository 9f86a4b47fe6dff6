package vmtests

import (
	"context"
	_ "embed"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

// growPy is a worker that grows on request and stops gracefully.
//
//go:embed testdata/grow.py
var growPy []byte

// testRecycle: under real systemd, a worker that grows past [recycle]
// memory is replaced with no failed request under load: the journal says
// "recycled (memory … > …)", the old worker exits 0 after its
// replacement is ready, cohort status counts a recycle and no restart,
// and systemd sees nothing (same MainPID, no service restart). Under
// nspawn on this cgroup-hybrid host the workers' cgroups have no memory
// controller, so the memory is the worker's process-tree RSS; under QEMU
// (pure cgroup2) it is the worker's cgroup's memory.current. The
// dispatcher says which, and the scenario requires the one the backend
// has. TestSystemd and TestQEMU both run it.
func testRecycle(t *testing.T, c *Container) {
	const app = "recycle"
	c.Watch(t, app+".socket", app+".service")
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/grow.py", growPy, 0o755)
	ep := c.Listen(t)
	startApp(t, c, app, fmt.Sprintf("command = %s\nworkers = 2\n%s\n[[listen]]\nname = \"http\"\naddress = \"%s\"\n",
		`["/usr/bin/python3", "/usr/local/lib/cohort-vmtest/grow.py"]`, lifeSettings, ep.Listen)+`
[recycle]
memory = "96M"
memory_interval = "500ms"
min_interval = "0s"
`)
	t.Cleanup(func() {
		c.Exec(t, "systemctl", "stop", app+".socket", app+".service")
		c.Exec(t, "rm", "-f", "/etc/cohort/"+app+".toml")
		c.Exec(t, "systemctl", "daemon-reload")
	})
	before := waitWorkersReady(t, c, app, 2, 30*time.Second)
	dispatcher := mainPID(t, c, app)
	source := "memory is each worker's process-tree RSS from /proc (no per-worker cgroup)"
	if c.vm != nil {
		source = "memory is each worker's cgroup memory.current"
	}
	c.WaitJournal(t, 10*time.Second, source, "-u", app+".service")

	opts := lifeLoad(0)
	opts.URL = "http://" + ep.Dial + "/"
	load := StartLoad(t, opts)
	load.WaitOK(t, 200, 30*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+ep.Dial+"/grow?mb=160", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("grow: %v", err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	m := regexp.MustCompile(`^grown worker (\d+) pid (\d+) by 160 MiB`).FindStringSubmatch(string(body))
	if m == nil {
		t.Fatalf("grow answered %q", body)
	}
	grown := time.Now()
	t.Logf("worker %s (pid %s) now holds 160 MiB more", m[1], m[2])
	line := c.WaitJournal(t, 30*time.Second, "recycled (memory", "-u", app+".service")
	if !regexp.MustCompile(`worker ` + m[1] + ` \(pid ` + m[2] + `\) recycled \(memory [0-9.]+M > 96M\): starting its replacement`).MatchString(line) {
		t.Errorf("journal:\n%s", line)
	}
	exit := c.WaitJournal(t, 30*time.Second, "pid "+m[2]+", generation 1) recycled (memory", "-u", app+".service")
	took := time.Since(grown)
	if !strings.Contains(exit, "exited with status 0 (SIGTERM sent by cohort)") {
		t.Errorf("the recycled worker did not end gracefully:\n%s", exit)
	}
	// The journal is in the dispatcher's order: the replacement was
	// ready before the old worker was told to stop.
	j := c.Journal(t, "-u", app+".service", "-o", "cat")
	start := strings.Index(j, line[strings.Index(line, "worker "+m[1]+" (pid "+m[2]+") recycled"):])
	ready := regexp.MustCompile(`worker ` + m[1] + ` \(pid \d+\) ready after`).FindStringIndex(j[max(start, 0):])
	if start < 0 || ready == nil || start+ready[0] > strings.Index(j, exit[strings.Index(exit, "worker "+m[1]+" (pid "+m[2]):]) {
		t.Errorf("the replacement of worker %s was not ready before the old one ended:\n%s", m[1], j)
	}
	after := waitWorkersReady(t, c, app, 2, 30*time.Second)
	load.WaitOK(t, 200, 30*time.Second)
	res, kinds := load.Stop()
	t.Logf("grown at %s, old worker gone %s later; load through the recycle: %v; failures: %v", grown.Format("15:04:05.000"), took.Round(time.Millisecond), res, kinds)
	if res.OK == 0 || res.Failed() != 0 {
		t.Errorf("load through the recycle: %v (%v); want 0 failed", res, kinds)
	}
	out := c.Run(t, "cohort", "status", "--json", app)
	if !regexp.MustCompile(`"recycles": 1,`).MatchString(out) || !strings.Contains(out, `"last_recycle": "memory `) || strings.Contains(out, `"restarts": 1`) {
		t.Errorf("cohort status --json after the recycle:\n%s", out)
	}
	for i, w := range after.Workers {
		was := before.Workers[i].PID
		if recycled := fmt.Sprint(w.Index) == m[1]; recycled == (w.PID == was) || w.Restarts != 0 {
			t.Errorf("worker %d: pid %d → %d, restarts %d (recycled: worker %s)", w.Index, was, w.PID, w.Restarts, m[1])
		}
	}
	if got := mainPID(t, c, app); got != dispatcher {
		t.Errorf("MainPID %d → %d: systemd restarted the service for a recycle", dispatcher, got)
	}
	if n := c.Property(t, app+".service", "NRestarts"); n != "0" {
		t.Errorf("NRestarts=%s", n)
	}
}
