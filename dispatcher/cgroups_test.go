package dispatcher

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
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/cgroup"
	"github.com/cohort-dev/cohort/internal/testcgroup"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// cgroupApp is an app whose workers fork a child and a setsid daemon (out
// of their process group) and wait.
func cgroupApp(workers int) *appfile.App {
	app := appfile.New("t")
	app.Command = []string{"/bin/sh", "-c", "sleep 300 & setsid sleep 300 & exec sleep 300"}
	app.Workers = appfile.Workers{N: workers}
	app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
	app.StopTimeout = 5 * time.Second
	app.Restart = appfile.Restart{Initial: 10 * time.Millisecond, Max: 100 * time.Millisecond, MinUptime: time.Second}
	return app
}

func cgroupDirOf(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return ""
	}
	p, _ := cgroup.ParseProcCgroup(string(b))
	return p
}

// workerCgroups lists the cgroups in base.
func workerCgroups(t *testing.T, base string) []string {
	t.Helper()
	es, err := os.ReadDir(base)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestWorkerCgroups: on the real kernel's cgroup2, every worker starts in
// a cgroup of its own, w<slot>-g<gen>-<n>; what it forks stays there, a
// setsid daemon too; when the worker dies its cgroup is killed (the
// daemon with it) and removed, and its restart gets a new one; status
// shows each worker's cgroup and its cpu.stat; a stop leaves no cgroup.
func TestWorkerCgroups(t *testing.T) {
	base := testcgroup.V2(t)
	rt := t.TempDir()
	rec, stop := startRun(t, Options{App: cgroupApp(2), CgroupBase: base, RuntimeDir: rt, Subreaper: false})
	from := 0
	ready := map[int]int{}
	for len(ready) < 2 {
		e := rec.wait(t, &from, 20*time.Second, "workers ready", func(e Event) bool { return e.Kind == WorkerReady })
		ready[e.Worker] = e.PID
	}
	dirs := map[int]string{}
	for slot, pid := range ready {
		rel := cgroupDirOf(t, pid)
		name := filepath.Base(rel)
		if !strings.HasPrefix(name, "w"+strconv.Itoa(slot)+"-g1-") || !strings.HasSuffix(base, filepath.Dir(rel)) {
			t.Fatalf("worker %d (pid %d) is in cgroup %s; want %s/w%d-g1-N", slot, pid, rel, base, slot)
		}
		dirs[slot] = filepath.Join(base, name)
	}
	var procs []int
	testsync.WaitFor(t, 10*time.Second, "worker 0's child and daemon in its cgroup", func() bool {
		procs, _ = cgroup.Procs(dirs[0])
		return len(procs) == 3
	})

	st := callStatus(t, filepath.Join(rt, control.SocketName))
	for _, w := range st.Workers {
		if w.Cgroup == nil || w.Cgroup.Path != dirs[w.Index] {
			t.Errorf("status of worker %d: cgroup %+v; want path %s", w.Index, w.Cgroup, dirs[w.Index])
		}
	}

	// Worker 0 dies: its child and its daemon go with its cgroup.
	syscall.Kill(ready[0], syscall.SIGKILL)
	next := rec.wait(t, &from, 20*time.Second, "worker 0 restarted", func(e Event) bool { return e.Kind == WorkerReady && e.Worker == 0 })
	testsync.WaitFor(t, 10*time.Second, "worker 0's old cgroup removed", func() bool {
		_, err := os.Stat(dirs[0])
		return os.IsNotExist(err)
	})
	for _, pid := range procs {
		if alive(pid) {
			if s, _ := procState(pid); s != "Z" {
				t.Errorf("pid %d of worker 0's cgroup survived it (state %s)", pid, s)
			}
		}
	}
	if got := filepath.Base(cgroupDirOf(t, next.PID)); got == filepath.Base(dirs[0]) || !strings.HasPrefix(got, "w0-g1-") {
		t.Errorf("worker 0's restart (pid %d) is in cgroup %s; want a new w0-g1-N", next.PID, got)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if left := workerCgroups(t, base); len(left) > 0 {
		t.Errorf("after the stop, cgroups left in %s: %v", base, left)
	}
}

// TestLimitsRefused: an app with [limits] does not start where there is no
// cgroup for its workers, nor where the controller is missing (this
// host's cgroup2 has none), and says which.
func TestLimitsRefused(t *testing.T) {
	app := cgroupApp(1)
	app.Limits = appfile.Limits{MemoryMax: 256 << 20}
	err := Run(t.Context(), Options{App: app, CgroupBase: filepath.Join(t.TempDir(), "none"), RuntimeDir: t.TempDir(), Stderr: &testsync.Buffer{}})
	if err == nil || !strings.Contains(err.Error(), "[limits] need a cgroup of each worker's own") {
		t.Errorf("Run without a cgroup: %v", err)
	}
	err = Run(t.Context(), Options{App: app, RuntimeDir: t.TempDir(), Stderr: &testsync.Buffer{}})
	if err == nil || !strings.Contains(err.Error(), "per-worker cgroups are off") {
		t.Errorf("Run with cgroups off: %v", err)
	}
	base := testcgroup.V2(t)
	have, _ := cgroup.Controllers(base)
	if slices.Contains(have, "memory") {
		t.Log("this cgroup2 has the memory controller: the refusal for a missing one is not tried here")
		return
	}
	err = Run(t.Context(), Options{App: app, CgroupBase: base, RuntimeDir: t.TempDir(), Stderr: &testsync.Buffer{}})
	if err == nil || !strings.Contains(err.Error(), "need the memory controller") {
		t.Errorf("Run without the memory controller: %v", err)
	}
	if left := workerCgroups(t, base); len(left) > 0 {
		t.Errorf("cgroups left in %s: %v", base, left)
	}
}

// TestTrampolineEntersCgroup: where clone3 is refused (systemd's seccomp
// filters), the trampoline moves itself into the worker's cgroup before
// it execs the command, which runs there and does not see the variable
// that said where.
func TestTrampolineEntersCgroup(t *testing.T) {
	base := testcgroup.V2(t)
	dir := filepath.Join(base, "w0-g1-1")
	if err := cgroup.Create(dir); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	script := `grep '^0::' /proc/self/cgroup; echo "env=${` + trampolineCgroupEnv + `:-unset}"`
	cmd := exec.Command(self, TrampolineArg, "-1", "-1", "/bin/sh", "sh", "-c", script)
	cmd.Env = append(os.Environ(), trampolineCgroupEnv+"="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("trampoline: %v\n%s", err, out)
	}
	if got := string(out); !strings.Contains(got, "/"+filepath.Base(base)+"/w0-g1-1\n") || !strings.Contains(got, "env=unset") {
		t.Errorf("the command said:\n%s\nwant it in %s, without %s", got, dir, trampolineCgroupEnv)
	}
}
