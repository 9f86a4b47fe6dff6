package vmtests

import (
	"encoding/json"
	"fmt"
	"path"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cgroupStatusJSON is what the cgroup scenario reads of `cohort status
// --json`.
type cgroupStatusJSON struct {
	Generation int `json:"generation"`
	Workers    []struct {
		Index      int    `json:"index"`
		PID        int    `json:"pid"`
		Generation int    `json:"generation"`
		State      string `json:"state"`
		Cgroup     *struct {
			Path          string  `json:"path"`
			MemoryCurrent *uint64 `json:"memory_current_bytes"`
			CPUUsageUsec  uint64  `json:"cpu_usage_usec"`
		} `json:"cgroup"`
	} `json:"workers"`
}

// cgroup2Root is where the container's cgroup2 hierarchy is mounted:
// /sys/fs/cgroup/unified under a hybrid systemd (the nspawn containers
// on this development machine), /sys/fs/cgroup on a cgroup2 one.
func cgroup2Root(t *testing.T, c *Container) string {
	t.Helper()
	out := c.Run(t, "findmnt", "-n", "-t", "cgroup2", "-o", "TARGET")
	first, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	if first == "" {
		t.Fatalf("no cgroup2 mount in the container")
	}
	return first
}

// cgroupOf is the cgroup2 path of pid in the container ("0::…").
func cgroupOf(t *testing.T, c *Container, pid int) string {
	t.Helper()
	out := c.Run(t, "cat", fmt.Sprintf("/proc/%d/cgroup", pid))
	for line := range strings.Lines(out) {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			return p
		}
	}
	t.Fatalf("pid %d has no cgroup2 line:\n%s", pid, out)
	return ""
}

// testCgroups: under real systemd the service is delegated; the
// dispatcher sits in the leaf "supervisor" of the service's cgroup (on
// 257 systemd put it there with DelegateSubgroup=, on 252 it moved itself
// before forking), each worker in w<slot>-g<gen>-<n> with its children,
// a setsid daemon included, under the default hardening and DynamicUser.
// Under load: a worker killed by SIGKILL takes its cgroup with it and its
// restart gets a new one; a reload's new generation gets new cgroups and
// the old ones go; a stop leaves no process and no cgroup. Where the
// container's cgroup2 has no memory controller (this development
// machine's hybrid hosts), an app with [limits] is refused with the
// reason in the journal.
func testCgroups(t *testing.T, c *Container) {
	const app = "cg"
	c.Watch(t, app+".socket", app+".service")
	worker := "/usr/local/lib/cohort-vmtest/cg-hello"
	installHello(t, c, worker)
	port := FreePort(t)
	cmd := fmt.Sprintf(`["/bin/sh", "-c", "setsid sleep 1000 & exec %s"]`, worker)
	startApp(t, c, app, appFile(cmd, 2, lifeSettings, port))
	t.Cleanup(func() {
		c.Exec(t, "systemctl", "stop", app+".socket", app+".service")
		c.Exec(t, "rm", "-f", "/etc/cohort/"+app+".toml")
		c.Exec(t, "systemctl", "daemon-reload")
	})
	waitWorkersReady(t, c, app, 2, 30*time.Second)

	unit := c.Run(t, "systemctl", "cat", app+".service")
	if !strings.Contains(unit, "\nDelegate=yes\n") || !strings.Contains(unit, "\nProtectControlGroups=no\n") || !strings.Contains(unit, "\nDynamicUser=yes\n") {
		t.Errorf("%s.service is not delegated with DynamicUser=yes:\n%s", app, unit)
	}
	wantSubgroup := c.Release.Systemd >= 254
	if got := strings.Contains(unit, "\nDelegateSubgroup=supervisor\n"); got != wantSubgroup {
		t.Errorf("systemd %d: DelegateSubgroup=supervisor in the unit: %v, want %v", c.Release.Systemd, got, wantSubgroup)
	}
	if res := c.Exec(t, "systemd-analyze", "verify", "--man=no", c.Property(t, app+".service", "FragmentPath")); res.Code != 0 || strings.Contains(res.Stderr, "Delegate") {
		t.Errorf("systemd-analyze verify: %s", res)
	}

	root := cgroup2Root(t, c)
	svc := c.Property(t, app+".service", "ControlGroup")
	if got := cgroupOf(t, c, mainPID(t, c, app)); got != svc+"/supervisor" {
		t.Errorf("the dispatcher is in cgroup %s, want %s/supervisor", got, svc)
	}
	workerRE := regexp.MustCompile(`^w(\d+)-g(\d+)-\d+$`)
	check := func(gen int) cgroupStatusJSON {
		t.Helper()
		var st cgroupStatusJSON
		if err := json.Unmarshal([]byte(c.Run(t, "cohort", "status", "--json", app)), &st); err != nil {
			t.Fatal(err)
		}
		for _, w := range st.Workers {
			cg := cgroupOf(t, c, w.PID)
			m := workerRE.FindStringSubmatch(path.Base(cg))
			if path.Dir(cg) != svc || m == nil || m[1] != strconv.Itoa(w.Index) || m[2] != strconv.Itoa(gen) {
				t.Errorf("worker %d (pid %d, gen %d) is in cgroup %s; want %s/w%d-g%d-N", w.Index, w.PID, gen, cg, svc, w.Index, gen)
			}
			if w.Cgroup == nil || w.Cgroup.Path != root+cg {
				t.Errorf("status of worker %d: cgroup %+v, want path %s", w.Index, w.Cgroup, root+cg)
			}
			// The daemon it left behind with setsid is in its cgroup.
			procs := strings.Fields(c.Run(t, "cat", root+cg+"/cgroup.procs"))
			if len(procs) != 2 {
				t.Errorf("cgroup %s holds %v; want the worker and its setsid sleep", cg, procs)
			}
		}
		return st
	}
	st := check(1)
	t.Logf("cgroups of %s.service: %s", app, strings.Join(strings.Fields(c.Run(t, "ls", root+svc)), " "))

	load := StartLoad(t, LoadOptions{URL: fmt.Sprintf("http://127.0.0.1:%d/", port), Requests: 1 << 30, Duration: 3 * time.Minute, Concurrency: 4, Timeout: 20 * time.Second})
	load.WaitOK(t, 50, 30*time.Second)

	// SIGKILL to worker 0: its cgroup is killed and removed, the slot
	// restarts in a new one.
	victim := st.Workers[0]
	oldCg := cgroupOf(t, c, victim.PID)
	c.Run(t, "kill", "-KILL", strconv.Itoa(victim.PID))
	Eventually(t, 30*time.Second, "worker 0's old cgroup removed", func() error {
		if c.Exec(t, "test", "-e", root+oldCg).Code == 0 {
			return fmt.Errorf("%s still there", oldCg)
		}
		return nil
	})
	waitWorkersReady(t, c, app, 2, 30*time.Second)
	check(1)

	// A reload: generation 2 in new cgroups, generation 1's gone.
	c.Run(t, "systemctl", "reload", app+".service")
	waitWorkersReady(t, c, app, 2, 30*time.Second)
	Eventually(t, 30*time.Second, "only generation 2's cgroups", func() error {
		left := strings.Fields(c.Run(t, "ls", root+svc))
		var workers []string
		for _, n := range left {
			if workerRE.MatchString(n) {
				workers = append(workers, n)
			}
		}
		if len(workers) != 2 || !strings.Contains(workers[0], "-g2-") || !strings.Contains(workers[1], "-g2-") {
			return fmt.Errorf("worker cgroups %v", workers)
		}
		return nil
	})
	check(2)
	load.WaitOK(t, 50, 30*time.Second)
	res, kinds := load.Stop()
	t.Logf("load across a SIGKILLed worker and a reload: %v (%v)", res, kinds)
	if res.Failed() > 0 {
		// Shared mode: the SIGKILLed worker's accepted connections die
		// with it; a reload loses none.
		t.Logf("%d requests failed around the SIGKILL (shared mode: the dead worker's connections)", res.Failed())
	}

	// A stop leaves no process and no cgroup.
	c.Run(t, "systemctl", "stop", app+".socket", app+".service")
	Eventually(t, 20*time.Second, "no cgroup left", func() error {
		if c.Exec(t, "test", "-e", root+svc).Code == 0 {
			return fmt.Errorf("%s is still there: %s", svc, c.Run(t, "find", root+svc, "-type", "d"))
		}
		return nil
	})
	if out := c.Exec(t, "pgrep", "-f", "cg-hello|sleep 1000").Stdout; strings.TrimSpace(out) != "" {
		t.Errorf("processes left after the stop: %s", out)
	}

	// [limits] where the memory controller is not on cgroup2.
	if c.Exec(t, "grep", "-qw", "memory", root+"/cgroup.subtree_control").Code == 0 {
		t.Logf("the container's cgroup2 has the memory controller: the refusal is not tried here (the limits scenarios run under QEMU)")
		return
	}
	c.WriteFile(t, "/etc/cohort/"+app+".toml", []byte(appFile(cmd, 2, lifeSettings+"\n[limits]\nmemory_max = \"256M\"\n", port)), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	// check says beforehand what the start then does.
	if res := c.Exec(t, "cohort", "check", "/etc/cohort/"+app+".toml"); res.Code != 1 || !strings.Contains(res.Stderr, "[limits] need the memory controller, which this host does not offer its services") {
		t.Errorf("cohort check of [limits] without the memory controller: %s; want exit 1 and the refusal", res)
	}
	c.Exec(t, "systemctl", "start", app+".service")
	c.WaitJournal(t, 20*time.Second, "[limits] need the memory controller", "-u", app+".service")
}
