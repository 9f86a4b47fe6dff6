package vmtests

import (
	"strings"
	"testing"
)

// testCheckHost: `cohort check` under each release's own systemd-analyze
// and systemd: a directive this systemd does not know is reported at its
// TOML line with the suggestion systemd's own list gives (257 and 252 word
// the warning differently), a command missing on this host is an error,
// and --offline turns both into warnings.
func testCheckHost(t *testing.T, c *Container) {
	const file = "/tmp/checkhost/web.toml"
	c.Run(t, "mkdir", "-p", "/tmp/checkhost")
	t.Cleanup(func() { c.Exec(t, "rm", "-rf", "/tmp/checkhost") })
	c.WriteFile(t, file, []byte(`command = ["/opt/checkhost/missing"]

[[listen]]
name = "http"
address = "127.0.0.1:1"

[service]
MemoryMx = "1G"
`), 0o644)
	want := file + ":1:12: command[0] \"/opt/checkhost/missing\" does not exist on this host\n" +
		file + ":8:1: [service] MemoryMx: systemd does not know this directive (did you mean \"MemoryMax\"?)\n"
	res := c.Exec(t, "cohort", "check", file)
	if res.Code != 1 || res.Stderr != want {
		t.Errorf("cohort check: %s\nwant stderr\n%s", res, want)
	}
	res = c.Exec(t, "cohort", "check", "--offline", file)
	if res.Code != 0 || strings.Count(res.Stderr, ": warning: ") != 2 {
		t.Errorf("cohort check --offline: %s; want 2 warnings, exit 0", res)
	}
	t.Logf("cohort check under systemd %d:\n%s", c.Release.Systemd, want)
}
