package dispatcher

import (
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/cpuset"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// TestCPULimit: under a quota of 1.5 CPUs on 2, workers = "auto" starts
// one worker (issue 18.3), it gets COHORT_CPUS=1 (an inherited one is
// dropped), and status says how the count was reached. A fixed count
// gives every worker the same COHORT_CPUS.
func TestCPULimit(t *testing.T) {
	t.Parallel()
	cpus, err := cpuset.Allowed()
	if err != nil {
		t.Fatal(err)
	}
	two := []int{cpus[0], cpus[0]} // pinning is not asked for: the count is what counts
	limit := &cpuset.Limit{Allowed: two, Quota: 150000, Period: 100000}
	app := appfile.New("q")
	app.Command = []string{"/bin/sh", "-c", `echo "cpus=$COHORT_CPUS"; exec sleep 60`}
	app.Workers = appfile.Workers{Auto: true}
	app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
	rt := t.TempDir()
	stdout := &testsync.Buffer{}
	rec, _ := startRun(t, Options{App: app, Limit: limit, Stdout: stdout, RuntimeDir: rt, Environ: []string{"PATH=/usr/bin:/bin", "COHORT_CPUS=7"}})
	from := 0
	rec.wait(t, &from, 10*time.Second, "start", func(e Event) bool { return e.Kind == WorkerStarted })
	rec.waitNotify(t, 10*time.Second, "READY=1")
	testsync.WaitFor(t, 10*time.Second, "the worker's line", func() bool { return strings.Contains(stdout.String(), "cpus=") })
	if got := stdout.String(); got != "q.0 | cpus=1\n" {
		t.Errorf("worker output %q, want one worker with COHORT_CPUS=1", got)
	}
	st := callStatus(t, rt+"/"+control.SocketName)
	if len(st.Workers) != 1 || st.CPUs != (control.CPUs{Count: 1, How: "affinity 2, cgroup cpu quota 1.50", WorkersAuto: true}) {
		t.Errorf("status: %d workers, cpus %+v", len(st.Workers), st.CPUs)
	}
	if n := rec.count(WorkerStarted); n != 1 {
		t.Errorf("%d workers started", n)
	}

	fixed := appfile.New("f")
	fixed.Command = app.Command
	fixed.Workers = appfile.Workers{N: 3}
	fixed.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
	out := &testsync.Buffer{}
	startRun(t, Options{App: fixed, Limit: limit, Stdout: out})
	testsync.WaitFor(t, 10*time.Second, "three workers' lines", func() bool { return strings.Count(out.String(), "cpus=") == 3 })
	if n := strings.Count(out.String(), "cpus=1\n"); n != 3 {
		t.Errorf("workers = 3 under 1.5 CPUs:\n%s", out)
	}
}
