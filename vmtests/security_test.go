package vmtests

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// maxExposure is the bound asserted on `systemd-analyze security` for an
// app with the default profile and DynamicUser=yes: the goal of issue #7.
// Measured: 1.5 on systemd 252 (bookworm) and 257 (trixie).
const maxExposure = 2.5

var exposureRE = regexp.MustCompile(`Overall exposure level for \S+: ([0-9]+(?:\.[0-9]+)?)`)

// testSecurity: systemd's own rating of the sandbox the generator writes by
// default (hardening = "default", no user, hence DynamicUser=yes). The
// figure is logged with the directives that still count against it.
func testSecurity(t *testing.T, c *Container) {
	const app = "secure"
	c.Watch(t, app+".service")
	port := FreePort(t)
	c.WriteFile(t, "/etc/cohort/"+app+".toml", []byte(fmt.Sprintf(`command = ["/usr/bin/python3", "-m", "http.server"]

[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, port)), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	if got := c.Property(t, app+".service", "DynamicUser"); got != "yes" {
		t.Fatalf("%s.service DynamicUser=%s; want yes (no user in the app file)", app, got)
	}
	res := c.Exec(t, "systemd-analyze", "security", "--no-pager", app+".service")
	m := exposureRE.FindStringSubmatch(res.Stdout)
	if res.Code != 0 || m == nil {
		t.Fatalf("systemd-analyze security %s.service: no overall exposure level: %s", app, res)
	}
	level, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatalf("exposure level %q: %v", m[1], err)
	}
	var against []string
	for _, l := range strings.Split(res.Stdout, "\n") {
		if f := strings.Fields(l); len(f) > 0 && (f[0] == "✗" || f[0] == "X") {
			against = append(against, strings.TrimSpace(l))
		}
	}
	t.Logf("%s (systemd %d): systemd-analyze security %s.service: overall exposure level %.1f; what counts against it:\n%s",
		c.Release.Name, c.Release.Systemd, app, level, strings.Join(against, "\n"))
	if level > maxExposure {
		t.Errorf("overall exposure level %.1f; want ≤ %.1f", level, maxExposure)
	}
}
