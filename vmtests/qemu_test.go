package vmtests

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testtool"
)

// TestQEMU runs the scenarios that need a real kernel with cgroup2
// controllers in a QEMU guest per release (qemu.go), the releases in
// parallel; the subtests of one release share its VM and run in order,
// like TestSystemd's. `make vmtest-qemu` runs it.
func TestQEMU(t *testing.T) {
	requireQEMU(t)
	for _, r := range SelectedReleases() {
		t.Run(r.Name, func(t *testing.T) {
			t.Parallel()
			c := BootVM(t, r)
			t.Run("boot", func(t *testing.T) { testVMBoot(t, c) })
			InstallCohort(t, c)
			t.Run("cgroup2", func(t *testing.T) { testVMCgroup2(t, c) })
			for _, s := range LimitScenarios { // limits_test.go: cohort's [limits]
				t.Run(s.Name, func(t *testing.T) { s.Run(t, c) })
			}
			// [recycle] memory on the workers' cgroups' memory.current.
			t.Run("recycle", func(t *testing.T) { testRecycle(t, c) })
		})
	}
}

// requireQEMU is Require for the QEMU scenarios, plus their host tools
// (qemu-system-x86, e2fsprogs), installed with apt when missing; when
// they still are, a skip on a laptop and a failure under CI.
func requireQEMU(t *testing.T) {
	t.Helper()
	Require(t)
	if err := prepareQEMU(t.Logf); err != nil {
		testtool.Missing(t, "QEMU backend: %v", err)
	}
}

// testVMBoot: the guest runs its release's systemd as PID 1 on a pure
// cgroup2 hierarchy whose root offers the memory, cpu and pids
// controllers, which is what the nspawn containers on a hybrid host lack.
func testVMBoot(t *testing.T, c *Container) {
	testVersion(t, c)
	out := c.Sh(t, `stat -fc %T /sys/fs/cgroup; cat /sys/fs/cgroup/cgroup.controllers; cat /proc/1/comm; uname -r
node -e 'console.log("node " + process.version)'; python3 -c 'print("python3 ok")'`)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 6 || !strings.HasPrefix(lines[4], "node v") || lines[5] != "python3 ok" {
		t.Fatalf("guest facts: %q", out)
	}
	if lines[0] != "cgroup2fs" {
		t.Errorf("/sys/fs/cgroup is %s; want cgroup2fs (a pure cgroup2 hierarchy)", lines[0])
	}
	for _, ctl := range []string{"memory", "cpu", "pids"} {
		if !strings.Contains(" "+lines[1]+" ", " "+ctl+" ") {
			t.Errorf("cgroup.controllers %q lacks %s", lines[1], ctl)
		}
	}
	if lines[2] != "systemd" {
		t.Errorf("PID 1 is %q; want systemd", lines[2])
	}
	t.Logf("%s: kernel %s, controllers %q, booted in %v", c.Release.Name, lines[3], lines[1], c.BootTime.Round(time.Millisecond))
}

// allocPy allocates (and touches) 1 MiB at a time up to its argument in
// MiB, then says so; past a memory max it is OOM-killed before that.
const allocPy = `import sys
b = []
for i in range(int(sys.argv[1])):
    b.append(bytearray(b"x") * (1 << 20))
print("allocated", len(b), "MiB", flush=True)
`

// oomtestSh runs the allocator past the unit's MemoryMax= and stays, so
// that the unit and its cgroup (and memory.events) outlive the kill.
const oomtestSh = `python3 /usr/local/lib/cohort-vmtest/alloc.py 256
echo "alloc exited $?"
exec sleep infinity
`

// testVMCgroup2: what per-worker cgroups rest on, under the guest's real
// systemd and kernel:
//   - a unit with MemoryMax= whose process allocates past it: the kernel's
//     OOM killer ends that process alone (OOMPolicy=continue keeps the
//     unit), and the unit's memory.events counts oom_kill 1;
//   - a Delegate=yes unit's cgroup offers memory, cpu and pids to its own
//     subtree: after moving its process into a leaf, a child cgroup gets
//     memory.max and pids.max of its own and the OOM kill in it is counted
//     in the child, not charged to a sibling;
//   - CPUQuota= holds a spinning process at its share (cpu.stat).
func testVMCgroup2(t *testing.T, c *Container) {
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/alloc.py", []byte(allocPy), 0o644)
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/oomtest.sh", []byte(oomtestSh), 0o644)

	t.Run("memorymax", func(t *testing.T) {
		c.Watch(t, "oomtest.service")
		c.Run(t, "systemd-run", "--unit=oomtest", "--property=MemoryMax=64M", "--property=MemorySwapMax=0",
			"--property=OOMPolicy=continue", "/bin/sh", "/usr/local/lib/cohort-vmtest/oomtest.sh")
		line := c.WaitJournal(t, 2*time.Minute, "alloc exited", "-u", "oomtest.service", "-o", "cat")
		if line != "alloc exited 137" {
			t.Errorf("allocator past MemoryMax=64M: %q; want it SIGKILLed (137)", line)
		}
		// systemd saw it too (it watches memory.events).
		c.WaitJournal(t, 30*time.Second, "killed by the OOM killer", "-u", "oomtest.service")
		cg := "/sys/fs/cgroup/system.slice/oomtest.service"
		if got := cgroupKey(t, c, cg+"/memory.events", "oom_kill"); got != 1 {
			t.Errorf("%s/memory.events: oom_kill %d; want 1", cg, got)
		}
		if got := strings.TrimSpace(c.Run(t, "cat", cg+"/memory.max")); got != strconv.Itoa(64<<20) {
			t.Errorf("%s/memory.max = %s; want %d", cg, got, 64<<20)
		}
		if got := c.Property(t, "oomtest.service", "ActiveState"); got != "active" {
			t.Errorf("oomtest.service is %s after the OOM kill; want active (OOMPolicy=continue, the shell lives)", got)
		}
		c.Run(t, "systemctl", "stop", "oomtest.service")
	})

	t.Run("delegate", func(t *testing.T) {
		c.Watch(t, "deleg.service")
		c.Run(t, "systemd-run", "--unit=deleg", "--property=Delegate=yes", "--property=MemoryMax=256M",
			"--property=TasksMax=200", "/bin/sleep", "infinity")
		cg := "/sys/fs/cgroup/system.slice/deleg.service"
		avail := strings.Fields(c.Run(t, "cat", cg+"/cgroup.controllers"))
		for _, ctl := range []string{"memory", "cpu", "pids"} {
			if !strings.Contains(" "+strings.Join(avail, " ")+" ", " "+ctl+" ") {
				t.Errorf("%s/cgroup.controllers = %q: %s is not available to the delegated subtree", cg, avail, ctl)
			}
		}
		// What a dispatcher does with its subtree: move itself into a leaf,
		// enable the controllers for children, give each worker its own.
		c.Sh(t, fmt.Sprintf(`cg=%s
mkdir $cg/supervisor $cg/w0 $cg/w1
for p in $(cat $cg/cgroup.procs); do echo $p > $cg/supervisor/cgroup.procs; done
echo "+memory +cpu +pids" > $cg/cgroup.subtree_control
echo 32M > $cg/w0/memory.max
echo 0 > $cg/w0/memory.swap.max
echo 50 > $cg/w0/pids.max`, cg))
		res := c.Exec(t, "/bin/sh", "-c", fmt.Sprintf(`echo $$ > %s/w0/cgroup.procs && exec python3 /usr/local/lib/cohort-vmtest/alloc.py 128`, cg))
		if res.Code != -1 { // killed by a signal: the exec'd python itself, no shell between
			t.Errorf("allocator in w0 (memory.max 32M): %s; want it killed", res)
		}
		if got := cgroupKey(t, c, cg+"/w0/memory.events", "oom_kill"); got != 1 {
			t.Errorf("w0/memory.events: oom_kill %d; want 1", got)
		}
		if got := cgroupKey(t, c, cg+"/w1/memory.events", "oom_kill"); got != 0 {
			t.Errorf("w1/memory.events: oom_kill %d; want 0 (the sibling was not charged)", got)
		}
		// A worker below its max allocates what it needs.
		res = c.Exec(t, "/bin/sh", "-c", fmt.Sprintf(`echo $$ > %s/w1/cgroup.procs && exec python3 /usr/local/lib/cohort-vmtest/alloc.py 64`, cg))
		if res.Code != 0 || !strings.Contains(res.Stdout, "allocated 64 MiB") {
			t.Errorf("allocator in w1 (no max of its own, unit max 256M): %s; want 64 MiB allocated", res)
		}
		if got := strings.TrimSpace(c.Run(t, "cat", cg+"/w0/pids.max")); got != "50" {
			t.Errorf("w0/pids.max = %s; want 50", got)
		}
		c.Run(t, "systemctl", "stop", "deleg.service")
		Eventually(t, 30*time.Second, "deleg.service's cgroup removed with its children", func() error {
			if res := c.Exec(t, "test", "-e", cg); res.Code == 0 {
				return fmt.Errorf("%s still exists", cg)
			}
			return nil
		})
	})

	t.Run("cpuquota", func(t *testing.T) {
		c.Watch(t, "spin.service")
		c.Run(t, "systemd-run", "--unit=spin", "--property=CPUQuota=20%", "/bin/sh", "-c", "while :; do :; done")
		cg := "/sys/fs/cgroup/system.slice/spin.service"
		if got := strings.TrimSpace(c.Run(t, "cat", cg+"/cpu.max")); got != "20000 100000" {
			t.Errorf("%s/cpu.max = %q; want \"20000 100000\"", cg, got)
		}
		// usage over a window of guest time, both read in one command.
		out := c.Sh(t, fmt.Sprintf(`u0=$(awk '$1=="usage_usec"{print $2}' %[1]s/cpu.stat); t0=$(cut -d' ' -f1 /proc/uptime)
sleep 5
u1=$(awk '$1=="usage_usec"{print $2}' %[1]s/cpu.stat); t1=$(cut -d' ' -f1 /proc/uptime)
echo $u0 $u1 $t0 $t1 $(awk '$1=="nr_throttled"{print $2}' %[1]s/cpu.stat)`, cg))
		f := strings.Fields(out)
		if len(f) != 5 {
			t.Fatalf("cpu.stat window: %q", out)
		}
		u0, _ := strconv.ParseFloat(f[0], 64)
		u1, _ := strconv.ParseFloat(f[1], 64)
		t0, _ := strconv.ParseFloat(f[2], 64)
		t1, _ := strconv.ParseFloat(f[3], 64)
		throttled, _ := strconv.Atoi(f[4])
		share := (u1 - u0) / 1e6 / (t1 - t0)
		t.Logf("spinning under CPUQuota=20%%: %.3f CPU over %.1f s, nr_throttled %d", share, t1-t0, throttled)
		if share > 0.25 || share <= 0 {
			t.Errorf("spinning process used %.3f CPU; want at most 0.20 (+ slack 0.05)", share)
		}
		if throttled == 0 {
			t.Error("cpu.stat nr_throttled 0: the quota never held the spinner back")
		}
		c.Run(t, "systemctl", "stop", "spin.service")
	})
}

// cgroupKey reads one "key value" line of a cgroup file in c.
func cgroupKey(t *testing.T, c *Container, path, key string) int {
	t.Helper()
	for _, line := range strings.Split(c.Run(t, "cat", path), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[0] == key {
			n, err := strconv.Atoi(f[1])
			if err != nil {
				t.Fatalf("%s: %q", path, line)
			}
			return n
		}
	}
	t.Fatalf("%s has no %s line", path, key)
	return 0
}
