package vmtests

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// statusWorker forks a child that spins a CPU, then execs the hello
// server: the worker's main process is idle, its child is not.
const statusWorker = `#!/bin/sh
python3 -c '
import time
end = time.time() + 600
while time.time() < end:
    pass
' &
exec /usr/local/lib/cohort-vmtest/cohort-hello
`

// testStatus: under systemd, `cohort status` says what is the matter
// when it cannot show an app (its socket waits for the first connection;
// no such app; the user is not root), shows a worker's CPU over its whole
// process tree once it runs, and without an app lists every app, as
// text and as JSON.
func testStatus(t *testing.T, c *Container) {
	const app = "stat"
	c.Watch(t, app+".socket", app+".service")
	bin, err := helloBin()
	if err != nil {
		t.Fatal(err)
	}
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/cohort-hello", bin, 0o755)
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/status.sh", []byte(statusWorker), 0o755)
	port := FreePort(t)
	c.WriteFile(t, "/etc/cohort/"+app+".toml", []byte(fmt.Sprintf(`command = ["/usr/local/lib/cohort-vmtest/status.sh"]
workers = 1
ready = "exec"
stop_timeout = "5s"

[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, port)), 0o644)
	t.Cleanup(func() {
		c.Exec(t, "systemctl", "stop", app+".socket", app+".service")
		c.Exec(t, "rm", "-f", "/etc/cohort/"+app+".toml")
		c.Exec(t, "systemctl", "daemon-reload")
	})
	c.Run(t, "systemctl", "daemon-reload")
	c.Run(t, "systemctl", "start", app+".socket")

	// Before the first connection.
	res := c.Exec(t, "cohort", "status", app)
	want := "cohort status stat: socket active, no worker started yet (socket activation: the first connection starts it; `systemctl start stat` starts it now)\n"
	if res.Code != 1 || res.Stderr != want {
		t.Errorf("status before the first connection: %s\nwant stderr %q", res, want)
	}
	if got := c.Property(t, app+".service", "ActiveState"); got != "inactive" {
		t.Errorf("cohort status started %s.service: %s", app, got)
	}
	res = c.Exec(t, "cohort", "status", "sttа")
	if res.Code != 2 || !strings.Contains(res.Stderr, "app name") {
		t.Errorf("status of an invalid name: %s", res)
	}
	res = c.Exec(t, "cohort", "status", "stta")
	known, ok := strings.CutPrefix(res.Stderr, `cohort status stta: no app "stta"; known apps: `)
	if res.Code != 1 || !ok || !strings.Contains(", "+strings.TrimSpace(known)+",", " stat,") {
		t.Errorf("status of an unknown app: %s", res)
	}

	// The first connection starts the service.
	c.Run(t, "curl", "-sS", "--max-time", "20", fmt.Sprintf("http://127.0.0.1:%d/", port))
	c.WaitJournal(t, 30*time.Second, "all 1 workers ready", "-u", app+".service")
	var st struct {
		App     string `json:"app"`
		Workers []struct {
			PID        int     `json:"pid"`
			State      string  `json:"state"`
			RSS        int64   `json:"rss_bytes"`
			CPUPercent float64 `json:"cpu_percent"`
			CPUWindow  float64 `json:"cpu_window_seconds"`
		} `json:"workers"`
	}
	Eventually(t, 30*time.Second, "the child's CPU in cohort status", func() error {
		out := c.Run(t, "cohort", "status", "--json", app)
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			return fmt.Errorf("cohort status --json: %v\n%s", err, out)
		}
		if len(st.Workers) != 1 || st.Workers[0].CPUPercent < 20 { // a spinning child: 100 % of a CPU when one is free
			return fmt.Errorf("workers %+v", st.Workers)
		}
		return nil
	})
	w := st.Workers[0]
	main := c.Run(t, "ps", "-o", "comm=,pcpu=", "-p", fmt.Sprint(w.PID))
	t.Logf("worker pid %d (%s): cpu %.1f%% over %.2fs, rss %d KiB", w.PID, strings.TrimSpace(main), w.CPUPercent, w.CPUWindow, w.RSS>>10)
	if !strings.HasPrefix(main, "cohort-hello") {
		t.Errorf("the worker's main process is %q, not the idle hello server", main)
	}

	// Not root: the socket is the service's user's.
	res = c.Exec(t, "runuser", "-u", "nobody", "--", "cohort", "status", app)
	if want := "cohort status stat: the control socket is readable by root and the app's user only: run as root (sudo cohort status stat)\n"; res.Code != 1 || res.Stderr != want {
		t.Errorf("status as nobody: %s\nwant stderr %q", res, want)
	}

	// Every app.
	out := c.Run(t, "cohort", "status")
	if !strings.Contains(out, "\n"+app+" ") || !strings.Contains(out, "ready 1/1") || !strings.Contains(out, "\n  "+app+".0 ") {
		t.Errorf("cohort status without an app lacks %s:\n%s", app, out)
	}
	var all []struct {
		App    string `json:"app"`
		Source string `json:"source"`
		Status *struct {
			Workers []struct {
				CPUPercent float64 `json:"cpu_percent"`
			} `json:"workers"`
		} `json:"status"`
		State string `json:"state"`
	}
	out = c.Run(t, "cohort", "status", "--json")
	if err := json.Unmarshal([]byte(out), &all); err != nil {
		t.Fatalf("cohort status --json: %v\n%s", err, out)
	}
	found := false
	for _, a := range all {
		if a.App == app {
			found = true
			if a.Source != "unit" || a.Status == nil || len(a.Status.Workers) != 1 {
				t.Errorf("cohort status --json, %s: %+v", app, a)
			}
		}
	}
	if !found {
		t.Errorf("cohort status --json lacks %s:\n%s", app, out)
	}
}
