package cgroup

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/testcgroup"
)

func TestParseFlatKeyed(t *testing.T) {
	kv, err := ParseFlatKeyed("usage_usec 10\nuser_usec 7\nsystem_usec 3\n")
	if err != nil || kv["usage_usec"] != 10 || kv["user_usec"] != 7 || len(kv) != 3 {
		t.Errorf("got %v, %v", kv, err)
	}
	for _, bad := range []string{"usage_usec\n", "a 1\na 2\n", "a -1\n", "a  1\n", " 1\n", "a 1 2\n", "a 18446744073709551616\n"} {
		if kv, err := ParseFlatKeyed(bad); err == nil {
			t.Errorf("ParseFlatKeyed(%q) = %v; want an error", bad, kv)
		}
	}
}

func TestParseMemoryEvents(t *testing.T) {
	e, err := ParseMemoryEvents("low 0\nhigh 12\nmax 3\noom 2\noom_kill 1\noom_group_kill 1\nsock_throttled 0\n")
	if want := (MemoryEvents{High: 12, Max: 3, OOM: 2, OOMKill: 1, OOMGroupKill: 1}); err != nil || e != want {
		t.Errorf("got %+v, %v; want %+v", e, err, want)
	}
}

func TestParseCPUStat(t *testing.T) {
	c, err := ParseCPUStat("usage_usec 2000\nuser_usec 1500\nsystem_usec 500\nnr_periods 10\nnr_throttled 4\nthrottled_usec 800\n")
	if want := (CPUStat{UsageUsec: 2000, UserUsec: 1500, SystemUsec: 500, NrPeriods: 10, NrThrottled: 4, ThrottledUsec: 800, HasThrottling: true}); err != nil || c != want {
		t.Errorf("got %+v, %v; want %+v", c, err, want)
	}
	// Without the cpu controller: usage only.
	if c, err := ParseCPUStat("usage_usec 5\nuser_usec 3\nsystem_usec 2\n"); err != nil || c.HasThrottling || c.UsageUsec != 5 {
		t.Errorf("got %+v, %v", c, err)
	}
	if _, err := ParseCPUStat("user_usec 3\n"); err == nil {
		t.Error("cpu.stat without usage_usec parsed")
	}
}

func TestParsePressure(t *testing.T) {
	p, err := ParsePressure("some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\nfull avg10=0.50 avg60=0.10 avg300=0.00 total=678\n")
	if err != nil || p.Some.Avg10 != 1.5 || p.Some.Total != 12345 || !p.HasFull || p.Full.Avg60 != 0.1 {
		t.Errorf("got %+v, %v", p, err)
	}
	if p, err := ParsePressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"); err != nil || p.HasFull {
		t.Errorf("got %+v, %v", p, err)
	}
	for _, bad := range []string{"", "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", "some avg10=101 avg60=0 avg300=0 total=0\n",
		"some avg10=NaN avg60=0 avg300=0 total=0\n", "some avg60=0 avg10=0 avg300=0 total=0\n", "some avg10=0 avg60=0 avg300=0\n",
		"some avg10=0 avg60=0 avg300=0 total=0\nsome avg10=0 avg60=0 avg300=0 total=0\n"} {
		if p, err := ParsePressure(bad); err == nil {
			t.Errorf("ParsePressure(%q) = %+v; want an error", bad, p)
		}
	}
}

func TestSelfPath(t *testing.T) {
	if p, ok := ParseProcCgroup("9:name=systemd:/x\n1:cpu:/\n0::/system.slice/web.service/supervisor\n"); !ok || p != "/system.slice/web.service/supervisor" {
		t.Errorf("ParseProcCgroup: %q, %v", p, ok)
	}
	if _, ok := ParseProcCgroup("1:cpu:/\n"); ok {
		t.Error("a v1-only /proc/self/cgroup has a cgroup2 path")
	}
	m, ok := ParseMountLine(`35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate`)
	if !ok || m.Point != "/sys/fs/cgroup/unified" || m.Root != "/" || !m.V2 {
		t.Errorf("ParseMountLine: %+v %v", m, ok)
	}
	if m, ok := ParseMountLine(`35 25 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu`); !ok || m.V2 {
		t.Errorf("a v1 mount: %+v %v", m, ok)
	}
	if _, ok := ParseMountLine(`35 25 0:30 / /sys/fs/cgroup/../x rw - cgroup2 cgroup2 rw`); ok {
		t.Error("a mount point with .. parsed")
	}
	for _, c := range []struct{ mount, root, p, want string }{
		{"/sys/fs/cgroup", "/", "/system.slice/web.service", "/sys/fs/cgroup/system.slice/web.service"},
		{"/sys/fs/cgroup", "/", "/", "/sys/fs/cgroup"},
		{"/sys/fs/cgroup", "/payload", "/payload/x", "/sys/fs/cgroup/x"},
	} {
		if got, err := Join(c.mount, c.root, c.p); err != nil || got != c.want {
			t.Errorf("Join(%q, %q, %q) = %q, %v; want %q", c.mount, c.root, c.p, got, err, c.want)
		}
	}
	for _, p := range []string{"/a/../b", "/other/x"} {
		if got, err := Join("/sys/fs/cgroup", "/payload", p); err == nil {
			t.Errorf("Join(%q) = %q; want an error", p, got)
		}
	}
}

func TestNeedsAndMissing(t *testing.T) {
	l := appfile.Limits{MemoryMax: 1 << 30, CPUQuota: 50, TasksMax: 10}
	if got := strings.Join(Needs(l), ","); got != "memory,cpu,pids" {
		t.Errorf("Needs = %s", got)
	}
	if Needs(appfile.Limits{}) != nil {
		t.Error("no limits need controllers")
	}
	if got := Missing(Needs(l), []string{"memory", "pids"}); got != "cpu" {
		t.Errorf("Missing = %q", got)
	}
}

// startIn forks argv straight into the cgroup f (CLONE_INTO_CGROUP) and
// returns it; it is killed and reaped at cleanup.
func startIn(t *testing.T, f *os.File, argv ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd()), Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

func cgroupOf(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + itoa(pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	p, _ := ParseProcCgroup(string(b))
	return p
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestWorkerPlacementKillRemove: a worker forked into its cgroup is there
// from its first instruction, what it forks stays there, Release kills
// all of it at once and the cgroup is gone after; the real kernel's
// cgroup2, no controllers needed.
func TestWorkerPlacementKillRemove(t *testing.T) {
	base := testcgroup.V2(t)
	tree := &Tree{Base: base}
	dir, f, err := tree.NewWorker("w0-g1-1", appfile.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	cmd := startIn(t, f, "/bin/sh", "-c", "sleep 300 & sleep 300 & wait")
	f.Close()
	if got := cgroupOf(t, cmd.Process.Pid); !strings.HasSuffix(dir, got) || !strings.HasSuffix(got, "/"+filepath.Base(base)+"/w0-g1-1") {
		t.Errorf("worker pid %d is in cgroup %s; want %s", cmd.Process.Pid, got, dir)
	}
	// Its children stay in its cgroup.
	var pids []int
	deadline := time.Now().Add(10 * time.Second)
	for len(pids) < 3 && time.Now().Before(deadline) {
		pids, _ = Procs(dir)
		time.Sleep(10 * time.Millisecond)
	}
	if len(pids) != 3 {
		t.Fatalf("cgroup %s holds %v; want the shell and its two sleeps", dir, pids)
	}
	if ok, err := Populated(dir); err != nil || !ok {
		t.Errorf("Populated = %v, %v; want true", ok, err)
	}
	// A second worker of the same slot (a reload's) beside it.
	dir2, f2, err := tree.NewWorker("w0-g2-2", appfile.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	f2.Close()
	err = Release(dir)
	for i := 0; Busy(err) && i < 500; i++ {
		time.Sleep(10 * time.Millisecond)
		err = Remove(dir)
	}
	if err != nil {
		t.Fatalf("release %s: %v", dir, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("cgroup %s still there: %v", dir, err)
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); err == nil && pid != cmd.Process.Pid {
			// The sleeps are the shell's children: reaped by init or
			// the shell; what must not be is one still running.
			if st, _ := os.ReadFile("/proc/" + itoa(pid) + "/stat"); len(st) > 0 && !strings.Contains(string(st), ") Z ") {
				t.Errorf("pid %d survived cgroup.kill: %s", pid, st)
			}
		}
	}
	if err := Release(dir2); err != nil {
		t.Errorf("release the empty %s: %v", dir2, err)
	}
}

// TestLimitsNeedControllers: limits in a cgroup without the controller
// are refused with the controller's name, and nothing is left behind.
func TestLimitsNeedControllers(t *testing.T) {
	base := testcgroup.V2(t)
	tree := &Tree{Base: base} // this host's cgroup2 has no controllers
	_, _, err := tree.NewWorker("w0-g1-1", appfile.Limits{MemoryMax: 1 << 30})
	if err == nil || !strings.Contains(err.Error(), "need the memory controller") {
		t.Fatalf("NewWorker with memory_max and no memory controller: %v", err)
	}
	if _, err := os.Stat(filepath.Join(base, "w0-g1-1")); !os.IsNotExist(err) {
		t.Errorf("the refused worker's cgroup is left: %v", err)
	}
	if _, _, err := tree.NewWorker("../x", appfile.Limits{}); err == nil {
		t.Error("a worker cgroup named ../x was made")
	}
}

// TestPrepareMovesItself: a process alone in its cgroup moves itself into
// the leaf and Base is its old cgroup; Close moves it back and removes
// the leaf. One sharing its cgroup is refused. The process is this test
// binary again (helperMain), started in a cgroup of its own.
func TestPrepareMovesItself(t *testing.T) {
	base := testcgroup.V2(t)
	alone := filepath.Join(base, "alone")
	if err := Create(alone); err != nil {
		t.Fatal(err)
	}
	f, err := Open(alone)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := runHelper(t, f)
	want := "base=" + alone + " leaf=" + filepath.Join(alone, "supervisor") + " closed=" + alone + " leafgone=true"
	if !strings.Contains(out, want) {
		t.Errorf("helper in %s said:\n%s\nwant %s", alone, out, want)
	}

	shared := filepath.Join(base, "shared")
	if err := Create(shared); err != nil {
		t.Fatal(err)
	}
	g, err := Open(shared)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	startIn(t, g, "sleep", "300")
	if out := runHelper(t, g); !strings.Contains(out, "holds 1 other processes") {
		t.Errorf("helper sharing %s said:\n%s", shared, out)
	}
}

const helperEnv = "COHORT_CGROUP_TEST_HELPER"

func runHelper(t *testing.T, f *os.File) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.v")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	out, _ := cmd.CombinedOutput()
	return string(out)
}

// TestHelperProcess is runHelper's child, not a test of its own.
func TestHelperProcess(t *testing.T) {
	if os.Getenv(helperEnv) == "" {
		t.Skip("helper process for TestPrepareMovesItself")
	}
	self, err := Self()
	if err != nil {
		t.Fatal(err)
	}
	tree, err := Prepare(self, "supervisor", All)
	if err != nil {
		t.Log(err)
		return
	}
	now, _ := Self()
	closeErr := tree.Close()
	after, _ := Self()
	_, statErr := os.Stat(now)
	t.Logf("base=%s leaf=%s closed=%s leafgone=%v (%v)", tree.Base, now, after, os.IsNotExist(statErr), closeErr)
}

// TestProcsOutsideNamespace: the kernel lists a process of another pid
// namespace as 0; that is a process, not a malformed file (cohort run in
// `unshare --pid` said "malformed line \"0\"" for its host's processes).
func TestProcsOutsideNamespace(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte("0\n4242\n0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	pids, err := Procs(dir)
	if err != nil || !slices.Equal(pids, []int{0, 4242, 0}) {
		t.Errorf("Procs = %v, %v; want [0 4242 0]", pids, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte("-1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Procs(dir); err == nil {
		t.Error("Procs took -1")
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := EnterLeaf(dir, "supervisor"); err == nil || !strings.Contains(err.Error(), "outside this pid namespace") {
		t.Errorf("EnterLeaf beside processes of another pid namespace: %v", err)
	}
}
