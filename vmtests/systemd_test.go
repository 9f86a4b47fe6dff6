package vmtests

import (
	"context"
	_ "embed"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestSystemd runs the same scenarios on every release, one container per
// release, the releases in parallel. The subtests of one release share its
// container and run in order; a failed install skips what depends on it.
func TestSystemd(t *testing.T) {
	Require(t)
	for _, r := range SelectedReleases() {
		t.Run(r.Name, func(t *testing.T) {
			t.Parallel()
			c := Boot(t, r)
			t.Run("version", func(t *testing.T) { testVersion(t, c) })
			// Not a subtest, so that -run can pick any single scenario.
			InstallCohort(t, c)
			t.Run("generator", func(t *testing.T) { testGenerator(t, c) })
			t.Run("serve", func(t *testing.T) { testServe(t, c) })
			t.Run("reload", func(t *testing.T) { testReload(t, c) })
			t.Run("roundrobin", func(t *testing.T) { testRoundRobin(t, c) })
			t.Run("rrhostile", func(t *testing.T) { testRoundRobinHostile(t, c) })
			t.Run("reuseport", func(t *testing.T) { testReusePort(t, c) })
			t.Run("hostilefiles", func(t *testing.T) { testHostileFiles(t, c) })
			t.Run("checkhost", func(t *testing.T) { testCheckHost(t, c) })
			t.Run("node", func(t *testing.T) { testNode(t, c) })
			t.Run("nodeunchanged", func(t *testing.T) { testNodeUnchanged(t, c) })
			t.Run("deploy", func(t *testing.T) { testDeploy(t, c) })
			t.Run("restart", func(t *testing.T) { testRestart(t, c) })
			t.Run("badedit", func(t *testing.T) { testBadEdit(t, c) })
			t.Run("killworker", func(t *testing.T) { testKillWorker(t, c) })
			t.Run("killdispatcher", func(t *testing.T) { testKillDispatcher(t, c) })
			t.Run("escape", func(t *testing.T) { testEscape(t, c) })
			t.Run("security", func(t *testing.T) { testSecurity(t, c) })
			t.Run("hostileunits", func(t *testing.T) { testHostileUnits(t, c) })
			t.Run("control", func(t *testing.T) { testControl(t, c) })
			t.Run("status", func(t *testing.T) { testStatus(t, c) })
			t.Run("cpuquota", func(t *testing.T) { testCPUQuota(t, c) })
			t.Run("cgroups", func(t *testing.T) { testCgroups(t, c) })
			t.Run("metrics", func(t *testing.T) { testMetrics(t, c) })
			t.Run("recycle", func(t *testing.T) { testRecycle(t, c) })
			t.Run("logflood", func(t *testing.T) { testLogFlood(t, c) })
			t.Run("purge", func(t *testing.T) { testPurge(t, c) }) // last: removes cohort
		})
	}
}

// testVersion: the container runs the systemd its release promises, so
// that a pass on "bookworm" really means systemd 252.
func testVersion(t *testing.T, c *Container) {
	first, _, _ := strings.Cut(c.Run(t, "systemctl", "--version"), "\n")
	f := strings.Fields(first) // systemd 257 (257.13-1~deb13u1)
	if len(f) < 2 || f[0] != "systemd" {
		t.Fatalf("systemctl --version: %q", first)
	}
	v, err := strconv.Atoi(f[1])
	if err != nil || v != c.Release.Systemd {
		t.Errorf("%s runs %q; want systemd %d", c.Release.Name, first, c.Release.Systemd)
	}
	t.Logf("%s: %s, booted in %v", c.Release.Name, first, c.BootTime.Round(time.Millisecond))
}

// testGenerator: under a real systemd, daemon-reload runs cohort-generator,
// which turns a valid app file into a socket and a service that systemd
// loads, verifies and (enable = true) starts with sockets.target, and a
// bad app file into one file:line:col journal line without stopping the
// good one.
func testGenerator(t *testing.T, c *Container) {
	c.Watch(t, "web.socket", "web.service")
	port := FreePort(t)
	c.WriteFile(t, "/etc/cohort/web.toml", []byte(fmt.Sprintf(`# a valid app
command = ["/usr/bin/python3", "-m", "http.server"]
enable = true

[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, port)), 0o644)
	c.WriteFile(t, "/etc/cohort/bad.toml", []byte(`# a typo on line 3
command = ["/usr/bin/python3", "-m", "http.server"]
wokers = 4
`), 0o644)
	c.Run(t, "systemctl", "daemon-reload")

	for _, u := range []string{"web.socket", "web.service"} {
		if got := c.Property(t, u, "LoadState"); got != "loaded" {
			t.Fatalf("%s: LoadState=%s; want loaded (generator output:\n%s)", u, got, c.Exec(t, "ls", "-lR", "/run/systemd/generator").Stdout)
		}
		if got := c.Property(t, u, "SourcePath"); got != "/etc/cohort/web.toml" {
			t.Errorf("%s: SourcePath=%q; want /etc/cohort/web.toml", u, got)
		}
	}
	units := c.Run(t, "systemctl", "cat", "web.socket", "web.service")
	if !regexp.MustCompile(`(?m)^ExecStart=\S*cohort dispatch /etc/cohort/web\.toml\b`).MatchString(units) {
		t.Errorf("web.service has no ExecStart running `cohort dispatch /etc/cohort/web.toml`:\n%s", units)
	}
	if !strings.Contains(units, fmt.Sprintf("ListenStream=127.0.0.1:%d", port)) {
		t.Errorf("web.socket does not listen on 127.0.0.1:%d:\n%s", port, units)
	}

	// systemd-analyze verify loads the generated files as systemd would and
	// checks every directive, the ExecStart binary included.
	paths := []string{c.Property(t, "web.socket", "FragmentPath"), c.Property(t, "web.service", "FragmentPath")}
	if res := c.Exec(t, append([]string{"systemd-analyze", "verify", "--man=no"}, paths...)...); res.Code != 0 || strings.TrimSpace(res.Stderr) != "" {
		t.Errorf("systemd-analyze verify %s: %s", strings.Join(paths, " "), res)
	}

	// The bad file: one precise line in the journal, and no units.
	// Not fatal: the checks below do not depend on it.
	const want = `/etc/cohort/bad.toml:3:1: unknown key "wokers"`
	if line, err := c.FindJournal(t, 10*time.Second, want); err != nil {
		t.Errorf("the generator's error for bad.toml is not in the journal: %v", err)
	} else {
		t.Logf("journal: %s", line)
	}
	if got := c.Property(t, "bad.service", "LoadState"); got != "not-found" {
		t.Errorf("bad.service: LoadState=%s; want not-found (a bad file emits no units)", got)
	}

	// enable = true: wanted by sockets.target, and started with it.
	if got := c.Property(t, "web.socket", "WantedBy"); !slices.Contains(strings.Fields(got), "sockets.target") {
		t.Errorf("web.socket: WantedBy=%q; want sockets.target", got)
	}
	c.Run(t, "systemctl", "start", "sockets.target")
	Eventually(t, 10*time.Second, "web.socket listening", func() error {
		state := c.Property(t, "web.socket", "ActiveState") + "/" + c.Property(t, "web.socket", "SubState")
		if state != "active/listening" {
			return fmt.Errorf("web.socket is %s", state)
		}
		return nil
	})
	// Listening in the (shared) network namespace: seen without connecting,
	// which would start web.service.
	if out := c.Run(t, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port)); !strings.Contains(out, "LISTEN") {
		t.Errorf("nothing listens on 127.0.0.1:%d after web.socket started: %q", port, out)
	}
}

// helloPy is a worker in plain Python that serves HTTP on fd 3.
//
//go:embed testdata/hello.py
var helloPy []byte

// testServe: a socket-activated app answers from its first request on.
// The first connection starts hello.service through hello.socket; systemd
// holds it until a worker accepts, so not one request fails, and every
// worker's stdout reaches the journal of the service.
func testServe(t *testing.T, c *Container) {
	c.Watch(t, "hello.socket", "hello.service")
	port := FreePort(t)
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/hello.py", helloPy, 0o755)
	c.WriteFile(t, "/etc/cohort/hello.toml", []byte(fmt.Sprintf(`command = ["/usr/bin/python3", "/usr/local/lib/cohort-vmtest/hello.py"]
workers = 2

[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, port)), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	c.Run(t, "systemctl", "start", "hello.socket")
	if got := c.Property(t, "hello.service", "ActiveState"); got != "inactive" {
		t.Errorf("hello.service is %s before the first connection; want inactive (socket activation)", got)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := Load(ctx, LoadOptions{
		URL:      fmt.Sprintf("http://127.0.0.1:%d/", port),
		Requests: 200, Duration: 30 * time.Second, Concurrency: 4, Timeout: 20 * time.Second,
	})
	t.Logf("load: %v", res)
	if err != nil || res.OK != 200 || res.Failed() != 0 {
		t.Errorf("load through hello.socket: %v (err %v); want 200 ok, 0 failed", res, err)
	}
	// Active once every worker is ready: with ready = "listening" that is
	// ready_settle after each was seen accepting, which a short load can
	// outrun.
	Eventually(t, 15*time.Second, "hello.service active after the load", func() error {
		if got := c.Property(t, "hello.service", "ActiveState"); got != "active" {
			return fmt.Errorf("hello.service is %s", got)
		}
		return nil
	})
	for _, w := range []string{"0", "1"} {
		c.WaitJournal(t, 10*time.Second, "hello.py: worker "+w+" serving", "-u", "hello.service")
	}
}
