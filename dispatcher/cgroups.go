package dispatcher

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/cgroup"
	"golang.org/x/sys/unix"
)

// Every worker process runs in a cgroup of its own (Options.Cgroups),
// made in spawn just before the fork and entered by clone3's
// CLONE_INTO_CGROUP, so the worker and everything it forks is there from
// its first instruction and cannot leave (a worker has no write access to
// any other cgroup.procs it could reach). That is what [limits] are
// written to, what `cohort status` reads a worker's memory and CPU from,
// and what stops a worker's whole tree at once: cgroup.kill.
//
// The cgroups are Base/w<slot>-g<generation>-<n>, n counting this
// dispatcher's forks, so a slot's old and new process coexist during a
// reload, and a restart never meets the cgroup of its predecessor that
// is still being emptied. The dispatcher itself sits in Base/supervisor:
// systemd ≥ 254 puts it there (DelegateSubgroup=supervisor, which the
// generator writes when the running systemd has it); otherwise it moves
// itself there before the first fork, being then the only process of the
// service's cgroup (internal/cgroup.Prepare).
//
// A reaped worker's cgroup is killed and removed; while its processes
// are still exiting, rmdir fails with EBUSY and the loop tries again
// (cgroupRetry apart) until it succeeds, for at most cgroupGiveUp.

const (
	cgroupRetry  = 50 * time.Millisecond
	cgroupGiveUp = time.Minute
)

// cgroups is the dispatcher's worker cgroups; the zero value has none.
type cgroups struct {
	tree *cgroup.Tree // nil: workers run in the dispatcher's cgroup
	// why is why tree is nil although cgroups were asked for ("" when
	// they were not): a [limits] table is refused with it.
	why   string
	forks int
	// gone are the cgroups of reaped workers that are still being
	// emptied, with when each was first tried.
	gone map[string]time.Time
	next time.Time // when to try gone again
	// noClone3: clone3 failed with ENOSYS; forkInto uses the trampoline.
	noClone3 bool
}

// openCgroups sets up d.cg from the options: nothing when cgroups are not
// asked for, Options.CgroupBase as it is, or the dispatcher's own
// cgroup made into a tree (cgroup.Prepare). It fails only when the app
// has [limits] and there is no tree for them.
func (d *dispatcher) openCgroups() error {
	d.cg.gone = map[string]time.Time{}
	switch {
	case d.opt.CgroupBase != "":
		have, err := cgroup.SubtreeControl(d.opt.CgroupBase)
		if err != nil {
			d.cg.why = err.Error()
			break
		}
		d.cg.tree = &cgroup.Tree{Base: d.opt.CgroupBase, Controllers: have}
	case d.opt.Cgroups:
		self, err := cgroup.Self()
		if err == nil {
			want := cgroup.All
			if d.opt.CgroupsForLimitsOnly {
				want = cgroup.Needs(d.app.Limits)
			}
			d.cg.tree, err = cgroup.Prepare(self, appfile.SupervisorCgroup, want)
		}
		if err != nil {
			d.cg.why = err.Error()
		}
	default:
		d.cg.why = "per-worker cgroups are off"
	}
	if t := d.cg.tree; t != nil {
		if t.EnableErr != nil {
			d.out.warnf("cgroups: not every controller could be enabled for the workers: %v", t.EnableErr)
		}
		d.out.infof("cgroups: one per worker in %s (controllers: %s)", t.Base, controllerList(t.Controllers))
		if slices.Contains(t.Controllers, "memory") {
			d.readMemory = cgroupMemory(d.readMemory)
			d.rec.source = "each worker's cgroup memory.current (its whole tree), and memory.high crossings from memory.events"
		}
	} else if d.opt.Cgroups && !d.app.Limits.Any() {
		d.out.infof("cgroups: workers share the dispatcher's cgroup: %s", d.cg.why)
	}
	return d.cg.check(d.app.Limits)
}

func controllerList(c []string) string {
	if len(c) == 0 {
		return "none"
	}
	return fmt.Sprint(c)
}

// check says whether l's limits can be written: a tree with the
// controllers they need. It reads only what openCgroups set, so a
// reload's loadSpec may call it off the loop.
func (c *cgroups) check(l appfile.Limits) error {
	if !l.Any() {
		return nil
	}
	if c.tree == nil {
		return fmt.Errorf("[limits] need a cgroup of each worker's own, and there is none: %s", c.why)
	}
	if m := cgroup.Missing(cgroup.Needs(l), c.tree.Controllers); m != "" {
		return fmt.Errorf("[limits] need the %s controller, which cgroup %s does not enable for the workers (enabled: %s; on a host with cgroup v1 controllers, the memory, cpu and pids controllers are not on cgroup2)", m, c.tree.Base, controllerList(c.tree.Controllers))
	}
	return nil
}

// newWorker makes slot's next worker cgroup with the app's limits; ""
// and nil without a tree.
func (d *dispatcher) newWorkerCgroup(slot int) (string, *os.File, error) {
	if d.cg.tree == nil {
		return "", nil, nil
	}
	d.cg.forks++
	name := fmt.Sprintf("w%d-g%d-%d", slot, d.gen, d.cg.forks)
	dir, f, err := d.cg.tree.NewWorker(name, d.app.Limits)
	if err != nil {
		return "", nil, fmt.Errorf("cgroup: %w", err)
	}
	return dir, f, nil
}

// noteOOM reads a reaped worker's memory.events before its cgroup goes:
// its OOM kills count for its slot (status), and a worker the kernel's
// OOM killer ended says so in its exit line instead of reading as a
// crash by SIGKILL. One small kernfs read, on the loop.
func (d *dispatcher) noteOOM(w *worker) {
	if w.cgroup == "" {
		return
	}
	e, err := cgroup.ReadMemoryEvents(w.cgroup)
	if err != nil {
		return // no memory controller
	}
	w.slot.oomKills += e.OOMKill
	w.oomKilled = e.OOMKill > 0 || e.OOMGroupKill > 0
}

// forkInto forks slot s's worker into its cgroup dir (opened as f): by
// clone3 with CLONE_INTO_CGROUP, so it is there before its first
// instruction; where clone3 fails with ENOSYS, which is what systemd's
// seccomp filters answer (RestrictNamespaces=, SystemCallFilter=: clone3's
// flags sit behind a pointer a filter cannot read, so systemd makes
// callers fall back to clone), by the trampoline, which moves itself in
// before it execs the command. The first ENOSYS decides for the rest of
// the dispatcher's life.
func (d *dispatcher) forkInto(s *slot, a forkArgs, dir string, f *os.File) (int, *os.File, *os.File, error) {
	if f != nil && !d.cg.noClone3 {
		a.cgroup = f
		pid, outR, statusR, err := d.fork(s, a)
		if !errors.Is(err, unix.ENOSYS) {
			return pid, outR, statusR, err
		}
		d.cg.noClone3 = true
		d.out.infof("cgroups: clone3 is refused here (%v); workers move into their cgroups before they exec", err)
	}
	a.cgroup, a.cgroupPath = nil, dir
	return d.fork(s, a)
}

// killCgroup SIGKILLs everything in w's cgroup at once, the worker and
// all it forked (nothing without one).
func (d *dispatcher) killCgroup(w *worker) {
	if w.cgroup != "" {
		cgroup.Kill(w.cgroup)
	}
}

// releaseCgroup kills what is left in a reaped worker's cgroup and
// removes it, now or, while its processes exit, from retryCgroups.
func (d *dispatcher) releaseCgroup(w *worker, now time.Time) {
	if w.cgroup == "" {
		return
	}
	if err := cgroup.Release(w.cgroup); err != nil {
		if _, ok := d.cg.gone[w.cgroup]; !ok {
			d.cg.gone[w.cgroup] = now
		}
		if d.cg.next.IsZero() {
			d.cg.next = now.Add(cgroupRetry)
		}
	}
}

// retryCgroups tries again to remove the cgroups of reaped workers.
func (d *dispatcher) retryCgroups(now time.Time) {
	if d.cg.next.IsZero() || now.Before(d.cg.next) {
		return
	}
	d.cg.next = time.Time{}
	for dir, since := range d.cg.gone {
		err := cgroup.Release(dir)
		switch {
		case err == nil:
			delete(d.cg.gone, dir)
		case now.Sub(since) > cgroupGiveUp:
			d.out.warnf("cgroup %s: still not removable after %s: %v; leaving it", dir, cgroupGiveUp, err)
			delete(d.cg.gone, dir)
		}
	}
	if len(d.cg.gone) > 0 {
		d.cg.next = now.Add(cgroupRetry)
	}
}

// closeCgroups, once every worker has been reaped, waits up to wait for
// the last worker cgroups to empty and go, then undoes what Prepare did.
func (d *dispatcher) closeCgroups(wait time.Duration) {
	if d.cg.tree == nil {
		return
	}
	deadline := time.Now().Add(wait)
	for len(d.cg.gone) > 0 && time.Now().Before(deadline) {
		time.Sleep(cgroupRetry)
		d.cg.next = time.Now()
		d.retryCgroups(time.Now())
	}
	for dir := range d.cg.gone {
		d.out.warnf("cgroup %s: still not removable at exit; leaving it", dir)
	}
	if err := d.cg.tree.Close(); err != nil && !errors.Is(err, os.ErrNotExist) {
		d.out.warnf("cgroups: %v", err)
	}
}
