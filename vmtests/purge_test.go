package vmtests

import (
	"fmt"
	"strings"
	"testing"
)

// testPurge: stopping an app's socket and service leaves none of its
// processes, and purging the package takes every generated unit with it.
// It removes cohort from the container, so TestSystemd runs it last.
func testPurge(t *testing.T, c *Container) {
	const app = "gone"
	c.Watch(t, app+".socket", app+".service")
	worker := "/usr/local/lib/cohort-vmtest/gone-worker"
	startHelloApp(t, c, app, worker)
	st := appStatus(t, c, app)
	dispatcher := mainPID(t, c, app)
	cgroup := c.Property(t, app+".service", "ControlGroup")
	procs := cgroupProcsFiles(t, c, cgroup)
	if len(procs) == 0 {
		t.Fatalf("%s.service: no cgroup.procs for ControlGroup=%q inside the container", app, cgroup)
	}
	if n := len(strings.Fields(c.Sh(t, "cat "+strings.Join(procs, " ")))); n < 1+lifeWorkers {
		t.Fatalf("%s: %d processes in %s before the stop; want the dispatcher and %d workers", app, n, cgroup, lifeWorkers)
	}

	// 1. systemctl stop: no process of the app is left.
	c.Run(t, "systemctl", "stop", app+".socket", app)
	for _, u := range []string{app + ".socket", app + ".service"} {
		if got := c.Property(t, u, "ActiveState"); got != "inactive" {
			t.Errorf("%s is %s after systemctl stop; want inactive", u, got)
		}
	}
	if left := appProcesses(t, c, worker, app); left != "" {
		t.Errorf("processes of %s after systemctl stop:\n%s", app, left)
	}
	for _, f := range cgroupProcsFiles(t, c, cgroup) {
		if left := strings.TrimSpace(c.Run(t, "cat", f)); left != "" {
			t.Errorf("%s still lists pids after systemctl stop: %s", f, left)
		}
	}
	if alive(t, c, dispatcher, "/usr/bin/cohort") {
		t.Errorf("the dispatcher (pid %d) still runs after systemctl stop", dispatcher)
	}
	for _, w := range st.Workers {
		if alive(t, c, w.PID, worker) {
			t.Errorf("worker %d (pid %d) still runs after systemctl stop", w.Index, w.PID)
		}
	}

	// 2. apt-get purge: no generated unit survives, whatever app it was
	// for (those of the scenarios before this one too), and prerm stopped
	// every app that still ran.
	apps := strings.Fields(c.Sh(t, `for f in /etc/cohort/*.toml; do basename "$f" .toml; done`))
	running := strings.TrimSpace(c.Sh(t, `ps -eo args= | grep -c '^/usr/bin/cohort dispatch ' || true`))
	c.Run(t, "apt-get", "purge", "-y", "cohort")
	c.Run(t, "systemctl", "daemon-reload")
	for _, a := range apps {
		for _, u := range []string{a + ".socket", a + ".service"} {
			if got := c.Property(t, u, "LoadState"); got != "not-found" {
				t.Errorf("%s: LoadState=%s after apt-get purge cohort; want not-found", u, got)
			}
		}
	}
	if res := c.Exec(t, "systemctl", "cat", app+".service"); res.Code == 0 {
		t.Errorf("systemctl cat %s.service still works after the purge:\n%s", app, res.Stdout)
	}
	if left := strings.TrimSpace(c.Sh(t, `grep -ls '^SourcePath=.*/cohort/' /run/systemd/generator*/* /run/systemd/generator*/*/* || true`)); left != "" {
		t.Errorf("generated units left after the purge:\n%s", left)
	}
	if left := strings.TrimSpace(c.Sh(t, `ls -d /run/systemd/generator/`+app+`.* 2>/dev/null || true`)); left != "" {
		t.Errorf("/run/systemd/generator still has %s", left)
	}
	if left := strings.TrimSpace(c.Sh(t, `ps -eo pid=,args= | grep -E 'cohort (dispatch|run)' | grep -v grep || true`)); left != "" {
		t.Errorf("cohort processes left after the purge:\n%s", left)
	}
	for _, f := range []string{"/usr/bin/cohort", "/usr/lib/systemd/system-generators/cohort-generator"} {
		if res := c.Exec(t, "test", "-e", f); res.Code == 0 {
			t.Errorf("%s is still there after the purge", f)
		}
	}
	t.Logf("after apt-get purge cohort: apps %v have no units; %s dispatchers ran before the purge, none after", apps, running)
}

// cgroupProcsFiles returns the cgroup.procs files of cgroup (a
// ControlGroup= path) and of the cgroups below it that exist in the
// container, in whichever hierarchy
// it mounts (unified, or the v1 name=systemd one under hybrid).
func cgroupProcsFiles(t *testing.T, c *Container, cgroup string) []string {
	t.Helper()
	if cgroup == "" {
		return nil
	}
	// The whole subtree: the service is delegated, and its dispatcher and
	// workers sit in cgroups below ControlGroup= (supervisor, w0-g1-1…).
	var files []string
	for _, base := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"} {
		out := c.Exec(t, "find", base+cgroup, "-name", "cgroup.procs", "-type", "f").Stdout
		files = append(files, strings.Fields(out)...)
	}
	return files
}

// appProcesses lists the processes that run worker or the dispatcher of
// app (empty when there are none). `systemctl stop` returns once the unit
// is inactive, so a single look, right after it, is the assertion.
func appProcesses(t *testing.T, c *Container, worker, app string) string {
	t.Helper()
	return strings.TrimSpace(c.Sh(t, fmt.Sprintf(`ps -eo pid=,stat=,args= | grep -F -e %q -e %q | grep -v grep || true`,
		worker, "cohort dispatch /etc/cohort/"+app+".toml")))
}
