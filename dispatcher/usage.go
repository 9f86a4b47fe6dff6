package dispatcher

import (
	"context"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/dispatcher/internal/procfs"
	"github.com/cohort-dev/cohort/internal/cgroup"
)

// What `cohort status` shows of a worker's resources is its whole process
// tree (procfs.Table.Tree): its process group, what left the group but
// descends from it, and the orphans it left that this dispatcher adopted
// as their subreaper and that still name it in WorkerPIDEnv. A preforking
// server (gunicorn, a node cluster) does its work in children; its main
// process alone reads as idle.
//
// CPU is recent use, not the average since the worker started, as top and
// PM2 show it: a worker that idled for a week and now spins must read
// 100 %, not 0.1 %. The window is the time since this handler's previous
// sample of the worker when that is between cpuMinWindow and cpuMaxAge
// old (`watch cohort status` gets the usage between two calls); otherwise
// the handler samples twice, cpuWindow apart, so a lone `cohort status`
// takes about cpuWindow. The window is reported with the figure
// (Worker.CPUWindow).

const (
	cpuWindow    = 500 * time.Millisecond // 50 ticks of a CPU: 2 % steps
	cpuMinWindow = 250 * time.Millisecond
	cpuMaxAge    = 10 * time.Second
	// usageTimeout bounds the /proc reading of one status request,
	// cpuWindow included.
	usageTimeout = 3 * time.Second
)

// workerKey names a worker process: a pid with its start, since pids are
// reused.
type workerKey struct {
	pid     int
	started time.Time
}

// cpuSample is a worker tree's CPU time at a moment.
type cpuSample struct {
	ticks uint64
	at    time.Time
}

// scanTrees reads the processes the worker trees of supervisor can hold:
// only supervisor's descendants when it is this process and the child
// subreaper (Options.Subreaper: every process of a worker tree then
// descends from it), so a status a second (cohort monit) costs what the
// workers' processes cost to read, whatever else runs on the host; else
// every process.
func scanTrees(ctx context.Context, supervisor int) (procfs.Table, error) {
	var sub int32
	err := unix.Prctl(unix.PR_GET_CHILD_SUBREAPER, uintptr(unsafe.Pointer(&sub)), 0, 0, 0)
	if err == nil && sub != 0 && supervisor == os.Getpid() {
		if t, ok, err := procfs.ScanTree(ctx, supervisor); ok {
			return t, err
		}
	}
	return procfs.Scan(ctx)
}

// usage fills in RSS, CPUSeconds, CPUPercent and CPUWindow of snap's
// workers. It reads /proc at most twice, for all workers together, and
// gives up (leaving zeros) when ctx or usageTimeout ends.
func (h *ctlHandler) usage(ctx context.Context, snap *statusSnapshot) {
	ctx, cancel := context.WithTimeout(ctx, usageTimeout)
	defer cancel()
	for i := range snap.st.Workers {
		if c := snap.st.Workers[i].Cgroup; c != nil {
			cgroupUsage(c)
		}
	}
	keys := make([]workerKey, len(snap.procs))
	for i, pid := range snap.procs {
		keys[i] = workerKey{pid, snap.st.Workers[i].Started}
	}
	measure := func() ([]procfs.Usage, time.Time, bool) {
		us, err := treeUsage(ctx, h.supervisor, snap.procs) // recycle.go: also what [recycle] memory reads
		return us, time.Now(), err == nil
	}
	now, at, ok := measure()
	if !ok {
		return
	}
	h.mu.Lock()
	prev := make([]cpuSample, len(keys))
	fresh := true
	for i, k := range keys {
		if k.pid == 0 {
			continue
		}
		p, found := h.last[k]
		if age := at.Sub(p.at); !found || age < cpuMinWindow || age > cpuMaxAge {
			fresh = false
		}
		prev[i] = p
	}
	h.mu.Unlock()
	if !fresh {
		// Some worker has no usable earlier sample: take one now and
		// measure over cpuWindow (all workers alike, so their figures
		// compare).
		for i, u := range now {
			prev[i] = cpuSample{ticks: u.Ticks, at: at}
		}
		t := time.NewTimer(cpuWindow)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
		if ctx.Err() == nil {
			if later, at2, ok := measure(); ok {
				now, at = later, at2
			}
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	next := make(map[workerKey]cpuSample, len(keys)) // only the workers of now: bounded
	for i, k := range keys {
		if k.pid == 0 {
			continue
		}
		w := &snap.st.Workers[i]
		u := now[i]
		w.RSS = u.RSS
		w.CPUSeconds = float64(u.Ticks) / procfs.ClockTick
		next[k] = cpuSample{ticks: u.Ticks, at: at}
		window := at.Sub(prev[i].at)
		if window <= 0 || u.Procs == 0 {
			continue
		}
		w.CPUWindow = window.Seconds()
		if u.Ticks > prev[i].ticks { // less when adopted orphans were reaped: count 0
			w.CPUPercent = 100 * float64(u.Ticks-prev[i].ticks) / procfs.ClockTick / window.Seconds()
		}
	}
	h.last = next
}

// cgroupUsage fills in what a worker's own cgroup says of it: its whole
// tree's memory (memory.current), CPU time (cpu.stat), memory.high
// crossings and OOM kills (memory.events) and pressure. A file that is
// missing (no such controller, no PSI) or unreadable leaves its figure
// out; the worker may have exited meanwhile.
func cgroupUsage(c *control.Cgroup) {
	if n, err := cgroup.MemoryCurrent(c.Path); err == nil {
		c.MemoryCurrent = &n
	}
	if e, err := cgroup.ReadMemoryEvents(c.Path); err == nil {
		c.MemoryHighEvents = e.High
		c.OOMKills += e.OOMKill
	}
	if st, err := cgroup.ReadCPUStat(c.Path); err == nil {
		c.CPUUsageUsec, c.CPUThrottledUsec = st.UsageUsec, st.ThrottledUsec
	}
	psi := func(resource string) *control.Pressure {
		p, err := cgroup.ReadPressure(c.Path, resource)
		if err != nil {
			return nil
		}
		return &control.Pressure{Some10: p.Some.Avg10, Some60: p.Some.Avg60}
	}
	c.MemoryPressure, c.CPUPressure = psi("memory"), psi("cpu")
}
