package vmtests

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// testHostileUnits: issue 14, item 1 under a real systemd. An app file
// whose address carries "\nExecStartPre=/usr/bin/touch /run/pwned" and
// whose [service] Environment= hides "User=root" behind a NUL (each ran a
// command or the app as root at 57c59ff) sits beside a good app. After
// daemon-reload the journal has the file:line:col refusals, the hostile
// app has no units, /run/pwned does not exist, and the good app serves;
// its '%' in an address reaches systemd escaped (Description=, Listen).
func testHostileUnits(t *testing.T, c *Container) {
	c.Watch(t, "goodapp.socket", "goodapp.service", "evil.socket", "evil.service")
	t.Cleanup(func() {
		c.Exec(t, "systemctl", "stop", "goodapp.socket", "goodapp-admin.socket", "goodapp.service", "evil.socket", "evil.service")
		c.Exec(t, "rm", "-f", "/etc/cohort/goodapp.toml", "/etc/cohort/evil.toml", "/run/pwned")
		c.Exec(t, "systemctl", "daemon-reload")
	})
	port := FreePort(t)
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/hello.py", helloPy, 0o755)
	c.WriteFile(t, "/etc/cohort/goodapp.toml", []byte(fmt.Sprintf(`command = ["/usr/bin/python3", "/usr/local/lib/cohort-vmtest/hello.py"]
workers = 2
[[listen]]
name = "http"
address = "127.0.0.1:%d"
[[listen]]
name = "admin"
address = "/run/goodapp-100%%n.sock"
`, port)), 0o644)
	c.WriteFile(t, "/etc/cohort/evil.toml", []byte(`command = ["/usr/bin/python3", "/usr/local/lib/cohort-vmtest/hello.py"]
[service]
Environment = "A=1\u0000User=root"
[[listen]]
name = "http"
address = "/run/a.sock\nExecStartPre=/usr/bin/touch /run/pwned"
`), 0o644)
	c.Exec(t, "rm", "-f", "/run/pwned")
	c.Run(t, "systemctl", "daemon-reload")

	for _, want := range []string{
		`/etc/cohort/evil.toml:3:1: [service] Environment = "A=1\x00User=root" holds the control character NUL (\0) at byte 3`,
		`/etc/cohort/evil.toml:6:1: address "/run/a.sock\nExecStartPre=/usr/bin/touch /run/pwned" holds the control character newline (\n) at byte 11`,
	} {
		if line, err := c.FindJournal(t, 10*time.Second, want); err != nil {
			t.Errorf("the refusal is not in the journal: %v", err)
		} else {
			t.Logf("journal: %s", line)
		}
	}
	for _, u := range []string{"evil.socket", "evil.service"} {
		if got := c.Property(t, u, "LoadState"); got != "not-found" {
			t.Errorf("%s: LoadState=%s; want not-found (a refused app has no units)", u, got)
		}
	}
	if out := c.Run(t, "ls", "/run/systemd/generator"); strings.Contains(out, "evil") {
		t.Errorf("the generator wrote units for evil.toml:\n%s", out)
	}
	// What the injection would have run: nothing may start it now.
	c.Exec(t, "systemctl", "start", "evil.socket")
	if res := c.Exec(t, "test", "-e", "/run/pwned"); res.Code == 0 {
		t.Error("/run/pwned exists: the injected ExecStartPre= ran")
	}

	// The good app: '%' reaches systemd as a literal.
	if got, want := c.Property(t, "goodapp-admin.socket", "Description"), "cohort app goodapp: listener admin on /run/goodapp-100%n.sock"; got != want {
		t.Errorf("goodapp-admin.socket: Description=%q; want %q", got, want)
	}
	if got := c.Property(t, "goodapp-admin.socket", "Listen"); !strings.Contains(got, "/run/goodapp-100%n.sock") {
		t.Errorf("goodapp-admin.socket: Listen=%q; want /run/goodapp-100%%n.sock", got)
	}
	c.Run(t, "systemctl", "start", "goodapp.socket")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := Load(ctx, LoadOptions{
		URL:      fmt.Sprintf("http://127.0.0.1:%d/", port),
		Requests: 200, Duration: 30 * time.Second, Concurrency: 4, Timeout: 20 * time.Second,
	})
	t.Logf("load on the good app: %v", res)
	if err != nil || res.OK != 200 || res.Failed() != 0 {
		t.Errorf("load through goodapp.socket: %v (err %v); want 200 ok, 0 failed", res, err)
	}
	if got := c.Property(t, "goodapp.service", "DynamicUser"); got != "yes" {
		t.Errorf("goodapp.service: DynamicUser=%q; want yes", got)
	}
	// The dispatcher runs as the dynamic user, not as root.
	if pid := c.Property(t, "goodapp.service", "MainPID"); pid == "0" {
		t.Error("goodapp.service has no main process")
	} else if uid := strings.TrimSpace(c.Run(t, "stat", "-c", "%u", "/proc/"+pid)); uid == "0" {
		t.Errorf("goodapp.service's dispatcher (pid %s) runs as root", pid)
	}
	if res := c.Exec(t, "test", "-e", "/run/pwned"); res.Code == 0 {
		t.Error("/run/pwned exists")
	}
	testEscapedPath(t, c)
}

// testEscapedPath: an app file in a directory whose name holds '%', '$',
// quotes, a backslash and a space reaches systemd as itself: SourcePath=
// and the ExecStart= argument, as systemd parsed them, are the path (the
// units are made with `cohort generate` into /run/systemd/system, as the
// generator only reads /etc/cohort and the other search directories).
func testEscapedPath(t *testing.T, c *Container) {
	const dir = `/srv/100%n "q" $HOME\d`
	const path = dir + "/pct.toml"
	t.Cleanup(func() {
		c.Exec(t, "rm", "-rf", dir, "/run/systemd/system/pct.service", "/run/systemd/system/pct.socket")
		c.Exec(t, "systemctl", "daemon-reload")
	})
	c.WriteFile(t, path, []byte(fmt.Sprintf("command = [\"/bin/true\"]\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:%d\"\n", FreePort(t))), 0o644)
	c.Run(t, "cohort", "generate", "--dir", "/run/systemd/system", path)
	c.Run(t, "systemctl", "daemon-reload")
	for _, u := range []string{"pct.socket", "pct.service"} {
		if got := c.Property(t, u, "SourcePath"); got != path {
			t.Errorf("%s: SourcePath=%q; want %q", u, got, path)
		}
	}
	// ExecStart={ path=… ; argv[]=/usr/bin/cohort dispatch <path> ; … }:
	// how systemctl prints argv (quoted or not, "$$" before exec-time
	// expansion) varies between releases, so check what a specifier
	// expansion would change.
	exec := c.Property(t, "pct.service", "ExecStart")
	t.Logf("pct.service: ExecStart=%s", exec)
	if !strings.Contains(exec, "argv[]=/usr/bin/cohort dispatch ") || !strings.Contains(exec, "/srv/100%n ") || strings.Contains(exec, "%%") || !strings.Contains(exec, "pct.toml") {
		t.Errorf("pct.service: ExecStart=%s; want argv[] = /usr/bin/cohort dispatch %s", exec, path)
	}
	if res := c.Exec(t, "systemd-analyze", "verify", "--man=no", "/run/systemd/system/pct.socket", "/run/systemd/system/pct.service"); res.Code != 0 || strings.TrimSpace(res.Stderr) != "" {
		t.Errorf("systemd-analyze verify: %s", res)
	}
}
