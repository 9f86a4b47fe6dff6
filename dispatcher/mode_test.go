package dispatcher

import (
	"os"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
)

// TestForkArgsCgroup: the seam for per-worker cgroups (issue 17) asks
// the kernel to start the worker in the given cgroup, and leaves it in
// the dispatcher's own when none is given.
func TestForkArgsCgroup(t *testing.T) {
	if sys := (forkArgs{}).sysProcAttr(); sys.UseCgroupFD || !sys.Setpgid || sys.Pdeathsig == 0 {
		t.Errorf("no cgroup: %+v, want Setpgid and Pdeathsig, no UseCgroupFD", sys)
	}
	dir, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	if sys := (forkArgs{cgroup: dir}).sysProcAttr(); !sys.UseCgroupFD || sys.CgroupFD != int(dir.Fd()) {
		t.Errorf("cgroup fd %d: UseCgroupFD %v CgroupFD %d", dir.Fd(), sys.UseCgroupFD, sys.CgroupFD)
	}
}

// TestAutoAcceptThreads: without accept_threads, one event loop per 4
// workers, at least 1, at most appfile.MaxAcceptThreads.
func TestAutoAcceptThreads(t *testing.T) {
	for workers, want := range map[int]int{1: 1, 2: 1, 4: 1, 5: 2, 16: 4, 64: 16, 1000: 64} {
		if got := autoAcceptThreads(workers); got != want {
			t.Errorf("autoAcceptThreads(%d) = %d, want %d", workers, got, want)
		}
	}
}

// TestRoundRobinConfig: the app file's round-robin settings reach the
// balancer.
func TestRoundRobinConfig(t *testing.T) {
	app := &appfile.App{MaxPending: 5, AckTimeout: 3 * time.Second, AcceptThreads: 3, AcceptInterval: 2 * time.Millisecond, Sticky: appfile.StickyProxyProtocol}
	cfg := newRoundRobin(app, nil, nil, &output{}).cfg
	if cfg.MaxPending != 5 || cfg.AckTimeout != 3*time.Second || cfg.AcceptThreads != 3 || cfg.AcceptInterval != 2*time.Millisecond || !cfg.ProxyProtocol || cfg.Sticky {
		t.Errorf("balance.Config %+v from %+v", cfg, app)
	}
}
