package vmtests

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testcgroup"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// testCPUQuota: a CPU quota of 1.5 CPUs on two CPUs or more makes
// workers = "auto" start one worker that sees COHORT_CPUS=1, and cohort
// status says how the count was reached (issue 18.3). The quota is the
// service's own `[service] CPUQuota=150%` where the container's systemd
// has the cpu controller (cgroup v2: systemd writes the service's
// cpu.max); on a host whose cpu controller is on cgroup v1 (the
// container then sees the host's v1 hierarchy, read-only, and systemd
// cannot use it) it is the container's: the whole container is moved
// into a v1 cpu cgroup of the host with cfs_quota_us 150000 per 100000,
// as a container runtime's --cpus=1.5 does, and moved back at the end.
func testCPUQuota(t *testing.T, c *Container) {
	const app = "quota"
	if n, _ := strconv.Atoi(strings.TrimSpace(c.Run(t, "nproc"))); n < 2 {
		testtool.Missing(t, "the container has %d CPUs; this scenario needs 2 or more", n)
	}
	c.Watch(t, app+".socket", app+".service")
	port := FreePort(t)
	service := "[service]\nCPUQuota = \"150%\"\n"
	if c.Exec(t, "grep", "-qw", "cpu", "/sys/fs/cgroup/cgroup.subtree_control").Code != 0 {
		service = ""
		quotaContainer(t, c)
	}
	startApp(t, c, app, fmt.Sprintf(`command = ["/bin/sh", "-c", "echo cpus=$COHORT_CPUS; exec sleep 600"]
workers = "auto"
ready = "exec"
stop_timeout = "5s"
%s
[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, service, port))
	t.Cleanup(func() {
		c.Exec(t, "systemctl", "stop", app+".socket", app+".service")
		c.Exec(t, "rm", "-f", "/etc/cohort/"+app+".toml")
		c.Exec(t, "systemctl", "daemon-reload")
	})
	if service != "" {
		cg := c.Property(t, app+".service", "ControlGroup")
		if got := strings.TrimSpace(c.Run(t, "cat", "/sys/fs/cgroup"+cg+"/cpu.max")); got != "150000 100000" {
			t.Fatalf("cpu.max of %s is %q, want 150000 100000", cg, got)
		}
	}
	waitWorkersReady(t, c, app, 1, 30*time.Second)
	c.WaitJournal(t, 20*time.Second, "cpus=1", "-u", app+".service")
	if j := c.Journal(t, "-u", app+".service", "-o", "cat"); strings.Contains(j, "cpus=2") || !strings.Contains(j, "starting 1 workers") {
		t.Errorf("journal of %s:\n%s", app, j)
	}
	out := c.Run(t, "cohort", "status", app)
	if !regexp.MustCompile(`(?m)^quota: workers auto = 1 \(affinity \d+, cgroup cpu quota 1\.50\)$`).MatchString(out) {
		t.Errorf("cohort status %s does not say how it counted:\n%s", app, out)
	}
}

// quotaContainer moves every process of c into a new cgroup v1 cpu cgroup
// of the host with a quota of 1.5 CPUs, or ends t with Missing when the
// host has no v1 cpu hierarchy. At cleanup they are moved back and the
// cgroup is removed.
func quotaContainer(t *testing.T, c *Container) {
	t.Helper()
	_, self := testcgroup.V1(t, "cpu")
	dir := testcgroup.New(t, self, [][2]string{{"cpu.cfs_period_us", "100000"}, {"cpu.cfs_quota_us", "150000"}})
	// Twice: what forked while the first pass moved its parent.
	testcgroup.Move(dir, c.cg.pids()...)
	testcgroup.Move(dir, c.cg.pids()...)
	if got := testcgroup.Dir(t, c.InitPID, "cpu"); got != dir {
		t.Fatalf("the container's systemd (pid %d) is in cpu cgroup %s, not %s", c.InitPID, got, dir)
	}
}
