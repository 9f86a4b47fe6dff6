package vmtests

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"
)

// testBadEdit: a typo in a running app's file, then daemon-reload, keeps
// the app's units and systemd's listening sockets as they were (issue 13,
// items 1 and 2), in shared and in reuseport mode, under a load that runs
// through the whole sequence:
//
//	typo → daemon-reload → surfaces while broken (journal, STATUS=,
//	systemctl status, cohort status/list/reload, systemctl reload) →
//	systemctl restart while broken → fix → daemon-reload →
//	systemctl restart
//
// with `ss -ltnp` showing systemd (pid 1) among the holders of every
// listening socket of the port after each step, and 0 failed requests.
func testBadEdit(t *testing.T, c *Container) {
	for _, mode := range []string{"shared", "reuseport"} {
		t.Run(mode, func(t *testing.T) { badEdit(t, c, mode) })
	}
	t.Run("strict", func(t *testing.T) { badEditStrict(t, c) })
}

// badEditStrict: with hardening = "strict" (PrivateUsers=yes) the
// dispatcher sees root's running configuration as owned by the overflow
// uid, and still runs it.
func badEditStrict(t *testing.T, c *Container) {
	const app = "badedit-strict"
	c.Watch(t, app+".socket", app+".service")
	worker := "/usr/local/lib/cohort-vmtest/" + app + "-worker"
	installHello(t, c, worker)
	port := FreePort(t)
	defer removeApp(t, c, app)
	startApp(t, c, app, appFile(fmt.Sprintf("[%q]", worker), badEditWorkers, "ready = \"notify\"\nhardening = \"strict\"\n", port))
	want := fmt.Sprintf("%d/%d workers ready", badEditWorkers, badEditWorkers)
	Eventually(t, 30*time.Second, app+" ready", func() error {
		if text := c.Property(t, app+".service", "StatusText"); !strings.Contains(text, want) {
			return fmt.Errorf("StatusText=%q (%s)", text, c.Property(t, app+".service", "ActiveState"))
		}
		return nil
	})
	systemdHolds(t, c, port, 1, "start with hardening = \"strict\"")
}

// badEditWorkers is the worker count, written on line 2 of the app file
// so that the typo's position is known.
const badEditWorkers = 2

func badEdit(t *testing.T, c *Container, mode string) {
	app := "badedit-" + mode
	c.Watch(t, app+".socket", app+".service")
	worker := "/usr/local/lib/cohort-vmtest/" + app + "-worker"
	installHello(t, c, worker)
	port := FreePort(t)
	file := "/etc/cohort/" + app + ".toml"
	good := appFile(fmt.Sprintf("[%q]", worker), badEditWorkers, fmt.Sprintf("mode = %q\n", mode)+lifeSettings, port)
	typo := strings.Replace(good, "\nworkers = ", "\nwokers = ", 1)
	sockets := 1
	if mode == "reuseport" {
		sockets = badEditWorkers
	}
	defer removeApp(t, c, app)

	startApp(t, c, app, good)
	before := badEditReady(t, c, app)
	systemdHolds(t, c, port, sockets, "started")
	if got := c.Exec(t, "stat", "-c", "%U %a", "/run/cohort-running/"+app+".toml"); strings.TrimSpace(got.Stdout) != "root 644" {
		t.Errorf("running configuration: owner and mode: %s; want root 644", got)
	}
	if got := c.Exec(t, "cat", "/run/cohort-running/"+app+".toml").Stdout; got != good {
		t.Errorf("running configuration differs from the file:\n%s", got)
	}
	if mode == "shared" {
		badEditUpgrade(t, c, app, good)
	}

	load := StartLoad(t, lifeLoad(port))
	load.WaitOK(t, 200, 30*time.Second)

	// 1. The typo and a daemon-reload: units and sockets stay.
	c.WriteFile(t, file, []byte(typo), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	for _, u := range []string{app + ".socket", app + ".service"} {
		if got := c.Property(t, u, "LoadState") + "/" + c.Property(t, u, "ActiveState"); got != "loaded/active" {
			t.Errorf("%s is %s after a typo and daemon-reload; want loaded/active", u, got)
		}
	}
	systemdHolds(t, c, port, sockets, "typo, daemon-reload")
	wantErr := file + `:2:1: unknown key "wokers" (did you mean "workers"?)`
	if line, err := c.FindJournal(t, 10*time.Second, wantErr+"; keeping the running configuration of "+app); err != nil {
		t.Errorf("the generator did not say it kept the running configuration: %v", err)
	} else {
		t.Logf("journal: %s", line)
	}
	load.WaitOK(t, 200, 30*time.Second)

	// 2. Every surface names the file and its first error.
	statusWant := "config: " + wantErr + "; running the last good configuration"
	Eventually(t, 15*time.Second, "StatusText names the broken file", func() error {
		if text := c.Property(t, app+".service", "StatusText"); !strings.Contains(text, statusWant) {
			return fmt.Errorf("StatusText=%q", text)
		}
		return nil
	})
	if out := c.Exec(t, "systemctl", "status", "--no-pager", "--lines=0", app).Stdout; !strings.Contains(out, statusWant) {
		t.Errorf("systemctl status %s does not name the broken file:\n%s", app, out)
	}
	if out := c.Run(t, "cohort", "status", app); !strings.Contains(out, statusWant) {
		t.Errorf("cohort status %s:\n%s", app, out)
	}
	var st struct {
		ConfigError string `json:"config_error"`
	}
	if out := c.Run(t, "cohort", "status", "--json", app); json.Unmarshal([]byte(out), &st) != nil || st.ConfigError != wantErr {
		t.Errorf("cohort status --json: config_error %q; want %q\n%s", st.ConfigError, wantErr, out)
	}
	list := c.Run(t, "cohort", "list")
	if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(app) + `\s+active/running\s+active/\S+\s+\d+\s+` + regexp.QuoteMeta(file+" (broken: "+wantErr+"; running the last good configuration)") + `$`).MatchString(list) {
		t.Errorf("cohort list does not mark %s:\n%s", app, list)
	}
	res := c.Exec(t, "cohort", "reload", app)
	if res.Code != 1 || !strings.Contains(res.Stderr, "cohort reload: "+wantErr) {
		t.Errorf("cohort reload %s while broken: %s; want exit 1 naming the error", app, res)
	}
	res = c.Exec(t, "systemctl", "reload", app)
	if res.Code == 0 {
		t.Errorf("systemctl reload %s while broken exited 0", app)
	}
	c.WaitJournal(t, 10*time.Second, "reload refused: "+file+" is broken", "-u", app+".service")
	after := badEditReady(t, c, app)
	if after.Generation != before.Generation || !samePIDs(before, after) {
		t.Errorf("a refused reload touched the workers: %+v → %+v", before, after)
	}
	systemdHolds(t, c, port, sockets, "refused reloads")

	// 3. A restart while the file is broken runs the running
	// configuration again.
	c.Run(t, "systemctl", "restart", app)
	c.WaitJournal(t, 10*time.Second, wantErr+"; keeping the running configuration of "+app, "-u", app+".service")
	badEditReady(t, c, app)
	systemdHolds(t, c, port, sockets, "restart while broken")
	load.WaitOK(t, 200, 30*time.Second)

	// 4. The fix and a daemon-reload: the file applies again.
	c.WriteFile(t, file, []byte(good), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	systemdHolds(t, c, port, sockets, "fix, daemon-reload")
	Eventually(t, 15*time.Second, "StatusText no longer names the file", func() error {
		if text := c.Property(t, app+".service", "StatusText"); strings.Contains(text, "config:") {
			return fmt.Errorf("StatusText=%q", text)
		}
		return nil
	})
	load.WaitOK(t, 200, 30*time.Second)

	// 5. systemctl restart.
	c.Run(t, "systemctl", "restart", app)
	badEditReady(t, c, app)
	systemdHolds(t, c, port, sockets, "restart")
	load.WaitOK(t, 200, 30*time.Second)

	ld, kinds := load.Stop()
	t.Logf("%s mode, load through typo → daemon-reload → refused reloads → restart → fix → daemon-reload → restart: %v; failures: %v; %d failed of %d", mode, ld, kinds, ld.Failed(), ld.Sent)
	// What the bad edit must never cause is a refused connection (systemd
	// lost the socket) or a request left waiting: both are 0. The two
	// `systemctl restart`s stop the workers; a keep-alive request that
	// races a worker's close is read as EOF or a reset (seen: 5 of 17,904
	// once on trixie, 0 in most runs) — the restart scenario's bound of
	// one per client and stopped generation, not the bad edit's doing.
	checkLoss(t, mode+" mode, the bad-edit sequence", 2, ld, kinds)

	// Stopped, the app forgets its running configuration: a broken file
	// is then skipped, as at boot.
	c.Run(t, "systemctl", "stop", app+".socket", app+".service")
	if res := c.Exec(t, "test", "-e", "/run/cohort-running/"+app+".toml"); res.Code == 0 {
		t.Errorf("the running configuration of %s is still there after stop", app)
	}
}

// samePIDs reports whether a and b list the same worker pids.
func samePIDs(a, b appStatusJSON) bool {
	if len(a.Workers) != len(b.Workers) {
		return false
	}
	for i := range a.Workers {
		if a.Workers[i].PID != b.Workers[i].PID {
			return false
		}
	}
	return true
}

// badEditReady waits until the service is active/running with every
// worker ready, and returns the status.
func badEditReady(t *testing.T, c *Container, app string) appStatusJSON {
	t.Helper()
	return waitWorkersReady(t, c, app, badEditWorkers, 30*time.Second)
}

// ssUsersRE finds systemd (pid 1) among the processes `ss -p` lists as
// holding a socket.
var ssUsersRE = regexp.MustCompile(`\("systemd",pid=1,fd=\d+\)`)

// systemdHolds checks with `ss -ltnp` that want sockets listen on port
// and that systemd (pid 1) holds each of them: it is systemd's socket,
// which survives a restart of the service.
func systemdHolds(t *testing.T, c *Container, port, want int, step string) {
	t.Helper()
	out := c.Run(t, "ss", "-Hltnp", fmt.Sprintf("sport = :%d", port))
	lines := strings.Split(strings.TrimSpace(out), "\n")
	held := 0
	for _, l := range lines {
		if ssUsersRE.MatchString(l) {
			held++
		}
	}
	if len(lines) != want || held != want || strings.TrimSpace(out) == "" {
		t.Errorf("after %s: %d of %d listening sockets on port %d held by systemd (pid 1); want %d of %d:\n%s", step, held, len(lines), port, want, want, out)
		return
	}
	t.Logf("after %s: ss -ltnp: %d socket(s) on :%d, each held by systemd (pid 1)", step, want, port)
}

// badEditUpgrade: an app started by a cohort without running
// configurations has none; the package's postinst records it (the units
// were just rendered from the file), so that the first broken edit after
// an upgrade keeps the app's sockets too.
func badEditUpgrade(t *testing.T, c *Container, app, good string) {
	t.Helper()
	const postinst = "/var/lib/dpkg/info/cohort.postinst"
	if installMethod() != "deb" {
		t.Logf("installed without the package (%s): no postinst to check", installMethod())
		return
	}
	snap := "/run/cohort-running/" + app + ".toml"
	c.Exec(t, "rm", "-f", snap)
	if res := c.Exec(t, postinst, "configure"); res.Code != 0 {
		t.Errorf("%s configure: %s", postinst, res)
	}
	if got := c.Exec(t, "cat", snap).Stdout; got != good {
		t.Errorf("after %s configure, %s holds %q; want the app file", postinst, snap, got)
	}
}
