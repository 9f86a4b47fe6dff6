package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testtool"
)

// v1Hierarchy returns where the cgroup v1 hierarchy with controller is
// mounted and this process's directory in it, or ends t with Missing.
func v1Hierarchy(t *testing.T, controller string) (mountPoint, self string) {
	t.Helper()
	if os.Geteuid() != 0 {
		testtool.Missing(t, "creating cgroups needs root")
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	root := ""
	for line := range strings.Lines(string(mi)) {
		pre, post, ok := strings.Cut(strings.TrimSpace(line), " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 3 && g[0] == "cgroup" && slices.Contains(strings.Split(g[2], ","), controller) {
			root, mountPoint = f[3], f[4]
			break
		}
	}
	if mountPoint == "" {
		testtool.Missing(t, "no cgroup v1 %s hierarchy is mounted (this test is for v1 hosts)", controller)
	}
	cg, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(cg)) {
		parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(parts) == 3 && slices.Contains(strings.Split(parts[1], ","), controller) {
			rel, ok := strings.CutPrefix(parts[2], root)
			if !ok {
				t.Fatalf("cgroup %s is not under the mount's root %s", parts[2], root)
			}
			return mountPoint, filepath.Join(mountPoint, rel)
		}
	}
	t.Fatalf("/proc/self/cgroup has no %s line:\n%s", controller, cg)
	return "", ""
}

// newV1Cgroup creates a cgroup under parent with files written in order,
// and removes it at cleanup: what still runs in it is moved to parent
// first (the test's processes are killed by then, so that is only ever a
// straggler being reaped).
func newV1Cgroup(t *testing.T, parent string, files [][2]string) string {
	t.Helper()
	dir := filepath.Join(parent, fmt.Sprintf("cohort-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := os.Remove(dir)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("cgroup %s not removed: %v", dir, err)
				return
			}
			if procs, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs")); len(procs) > 0 {
				for pid := range strings.FieldsSeq(string(procs)) {
					os.WriteFile(filepath.Join(parent, "cgroup.procs"), []byte(pid), 0o644)
				}
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

// runInCgroup runs `cohort run` with workers = "auto" inside the cgroup
// dir (a shell moves itself into it and execs cohort, so that the
// dispatcher starts there), each worker printing its COHORT_CPUS, and
// returns the worker lines once the dispatcher is ready and the status
// line that says how the count was reached.
func runInCgroup(t *testing.T, dir string) (workerLines []string, status string) {
	t.Helper()
	outPath := filepath.Join(t.TempDir(), "stdout")
	out, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	via := []string{"/bin/sh", "-c", `echo $$ > "$0/cgroup.procs" && exec "$@"`, dir}
	p := startCohortProcVia(t, out, via, "--listen", "127.0.0.1:0", "--workers", "auto", "--ready", "exec", "--name", "cg",
		"--", "/bin/sh", "-c", `echo "cpus=$COHORT_CPUS"; exec sleep 60`)
	p.port(t)
	waitUntil(t, 30*time.Second, "the dispatcher's ready line", func() bool { return regexp.MustCompile(`all \d+ workers ready`).MatchString(p.stderr.String()) })
	m := controlRE.FindStringSubmatch(p.stderr.String())
	if m == nil {
		t.Fatalf("no control socket line:\n%s", p.stderr)
	}
	code, stOut, stErr := runCohort(t, nil, "status", "--socket", m[1])
	if code != 0 {
		t.Fatalf("status: %d %s", code, stErr)
	}
	for line := range strings.Lines(stOut) {
		if strings.HasPrefix(line, "cg: workers auto") {
			status = strings.TrimSpace(line)
		}
	}
	// Every worker that is ready (after its exec) has printed, first
	// thing: wait for as many lines as ready workers.
	waitUntil(t, 10*time.Second, "the workers' lines", func() bool {
		b, _ := os.ReadFile(outPath)
		return strings.Count(string(b), "cpus=") >= strings.Count(p.stderr.String(), ") ready after ")
	})
	b, _ := os.ReadFile(outPath)
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for sc.Scan() {
		workerLines = append(workerLines, sc.Text())
	}
	return workerLines, status
}

// TestCgroupCPUQuota: a real cgroup v1 CPU quota of 1.5 CPUs (150 ms per
// 100 ms) on a machine with at least 2 CPUs: workers = "auto" starts
// exactly 1 worker, with COHORT_CPUS=1, and status says why (issue 18.3).
func TestCgroupCPUQuota(t *testing.T) {
	_, self := v1Hierarchy(t, "cpu")
	cpus, _ := os.ReadFile("/proc/self/status")
	if !regexp.MustCompile(`(?m)^Cpus_allowed_list:\s*\d+[-,]`).Match(cpus) {
		testtool.Missing(t, "this test needs 2 CPUs or more")
	}
	dir := newV1Cgroup(t, self, [][2]string{{"cpu.cfs_period_us", "100000"}, {"cpu.cfs_quota_us", "150000"}})
	lines, status := runInCgroup(t, dir)
	if !slices.Equal(lines, []string{"[cg.0] cpus=1"}) {
		t.Errorf("worker lines %q, want one worker with COHORT_CPUS=1", lines)
	}
	if !regexp.MustCompile(`^cg: workers auto = 1 \(affinity \d+, cgroup cpu quota 1\.50\)$`).MatchString(status) {
		t.Errorf("status line %q", status)
	}
}

// TestCgroupCpuset: a real cgroup v1 cpuset of one CPU: one worker with
// COHORT_CPUS=1.
func TestCgroupCpuset(t *testing.T) {
	_, self := v1Hierarchy(t, "cpuset")
	mems, err := os.ReadFile(filepath.Join(self, "cpuset.mems"))
	if err != nil {
		t.Fatal(err)
	}
	allowed, err := os.ReadFile(filepath.Join(self, "cpuset.effective_cpus"))
	if err != nil {
		t.Fatal(err)
	}
	first := regexp.MustCompile(`^\d+`).Find(allowed)
	if first == nil {
		t.Fatalf("cpuset.effective_cpus %q", allowed)
	}
	dir := newV1Cgroup(t, self, [][2]string{{"cpuset.mems", strings.TrimSpace(string(mems))}, {"cpuset.cpus", string(first)}})
	lines, status := runInCgroup(t, dir)
	if !slices.Equal(lines, []string{"[cg.0] cpus=1"}) {
		t.Errorf("worker lines %q, want one worker with COHORT_CPUS=1", lines)
	}
	if status != "cg: workers auto = 1 (affinity 1)" {
		t.Errorf("status line %q", status)
	}
}
