package main

import (
	"bufio"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testcgroup"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// runInCgroup runs `cohort run` with workers = "auto" inside the cgroup
// dir (a shell moves itself into it and execs cohort, so that the
// dispatcher starts there), each worker printing its COHORT_CPUS, and
// returns the worker lines once the dispatcher is ready and the status
// line that says how the count was reached.
func runInCgroup(t *testing.T, dir string) (workerLines []string, status string) {
	t.Helper()
	return runInCgroupVia(t, dir, nil)
}

// runInCgroupVia is runInCgroup with cohort run started through via (an
// argv prefix that execs the rest) once in the cgroup.
func runInCgroupVia(t *testing.T, dir string, via []string) (workerLines []string, status string) {
	t.Helper()
	outPath := filepath.Join(t.TempDir(), "stdout")
	out, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	via = append([]string{"/bin/sh", "-c", `echo $$ > "$0/cgroup.procs" && exec "$@"`, dir}, via...)
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
	_, self := testcgroup.V1(t, "cpu")
	cpus, _ := os.ReadFile("/proc/self/status")
	if !regexp.MustCompile(`(?m)^Cpus_allowed_list:\s*\d+[-,]`).Match(cpus) {
		testtool.Missing(t, "this test needs 2 CPUs or more")
	}
	dir := testcgroup.New(t, self, [][2]string{{"cpu.cfs_period_us", "100000"}, {"cpu.cfs_quota_us", "150000"}})
	lines, status := runInCgroup(t, dir)
	if !slices.Equal(lines, []string{"cg.0 | cpus=1"}) {
		t.Errorf("worker lines %q, want one worker with COHORT_CPUS=1", lines)
	}
	if !regexp.MustCompile(`^cg: workers auto = 1 \(affinity \d+, cgroup cpu quota 1\.50\)$`).MatchString(status) {
		t.Errorf("status line %q", status)
	}
}

// TestCgroupCpuset: a real cgroup v1 cpuset of one CPU: one worker with
// COHORT_CPUS=1.
func TestCgroupCpuset(t *testing.T) {
	_, self := testcgroup.V1(t, "cpuset")
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
	dir := testcgroup.New(t, self, [][2]string{{"cpuset.mems", strings.TrimSpace(string(mems))}, {"cpuset.cpus", string(first)}})
	lines, status := runInCgroup(t, dir)
	if !slices.Equal(lines, []string{"cg.0 | cpus=1"}) {
		t.Errorf("worker lines %q, want one worker with COHORT_CPUS=1", lines)
	}
	if status != "cg: workers auto = 1 (affinity 1)" {
		t.Errorf("status line %q", status)
	}
}
