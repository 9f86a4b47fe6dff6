// Package testcgroup makes cgroup directories for tests and removes them
// again, also when the test fails: v2 ones (V2) anywhere cgroup2 is
// mounted, and v1 ones (V1) on hosts with v1 hierarchies (this
// development machine has cpu and cpuset on v1, and a cgroup2 hierarchy
// without controllers). It reads mountinfo itself rather than through
// internal/cpuset or internal/cgroup, whose reading is what these tests
// check.
package testcgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testtool"
)

// V1 returns where the cgroup v1 hierarchy with controller is mounted and
// the directory of this process's cgroup in it, or ends t with
// testtool.Missing (skip on a laptop, fail under CI) when there is none
// or the test is not root.
func V1(t testing.TB, controller string) (mount, self string) {
	t.Helper()
	if os.Geteuid() != 0 {
		testtool.Missing(t, "creating cgroups needs root")
	}
	mount, _ = v1Mount(t, controller)
	if mount == "" {
		testtool.Missing(t, "no cgroup v1 %s hierarchy is mounted (this test is for v1 hosts)", controller)
	}
	return mount, Dir(t, os.Getpid(), controller)
}

// Dir is the directory of pid's cgroup in the v1 hierarchy with
// controller, as /proc/PID/cgroup says, under the hierarchy's mount.
func Dir(t testing.TB, pid int, controller string) string {
	t.Helper()
	mount, root := v1Mount(t, controller)
	file := fmt.Sprintf("/proc/%d/cgroup", pid)
	cg, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(cg)) {
		parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(parts) == 3 && slices.Contains(strings.Split(parts[1], ","), controller) {
			rel, ok := strings.CutPrefix(parts[2], strings.TrimSuffix(root, "/"))
			if !ok {
				t.Fatalf("%s: cgroup %s is not under the mount's root %s", file, parts[2], root)
			}
			return filepath.Join(mount, rel)
		}
	}
	t.Fatalf("%s has no %s line:\n%s", file, controller, cg)
	return ""
}

// v1Mount is the mount point and root of the v1 hierarchy with
// controller; "" when none is mounted.
func v1Mount(t testing.TB, controller string) (mount, root string) {
	t.Helper()
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(mi)) {
		pre, post, ok := strings.Cut(strings.TrimSpace(line), " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 3 && g[0] == "cgroup" && slices.Contains(strings.Split(g[2], ","), controller) {
			return f[4], f[3]
		}
	}
	return "", ""
}

// New creates a cgroup under parent with files written in order, and
// removes it at cleanup: what still runs in it is moved to parent first
// (a test's processes are stopped by then, so that is only ever a
// straggler being reaped).
func New(t testing.TB, parent string, files [][2]string) string {
	t.Helper()
	dir := filepath.Join(parent, fmt.Sprintf("cohort-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		deadline := time.Now().Add(15 * time.Second)
		for {
			Move(parent, Procs(dir)...)
			err := os.Remove(dir)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("cgroup %s not removed: %v", dir, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f[0]), []byte(f[1]), 0o644); err != nil {
			t.Fatalf("cgroup %s: %v", dir, err)
		}
	}
	return dir
}

// Procs lists the processes in the cgroup dir.
func Procs(dir string) []int {
	b, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	var pids []int
	for f := range strings.FieldsSeq(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Move moves pids into the cgroup dir; a process that exited meanwhile
// cannot move, which is fine.
func Move(dir string, pids ...int) {
	for _, pid := range pids {
		_ = os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644)
	}
}
