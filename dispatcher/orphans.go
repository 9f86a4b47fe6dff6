package dispatcher

import (
	"fmt"
	"strconv"
	"time"
	"unsafe"

	"github.com/cohort-dev/cohort/dispatcher/internal/procfs"
	"golang.org/x/sys/unix"
)

// A worker's processes live and die with it (issue 14.7). Its process
// group is killed before the worker is reaped (reap), but a process that
// called setsid(2) (a double-forking daemon) has left the group. With
// Options.Subreaper the dispatcher is a child subreaper
// (PR_SET_CHILD_SUBREAPER): a process whose parent dies is reparented to
// the dispatcher rather than to init, so every escaped process of a worker
// ends up as the dispatcher's own child, where it can be found and killed
// without a pid race (a child's pid is not reused until it is reaped).
//
// Which worker an orphan came from is told by WorkerPIDEnv, which the
// trampoline puts first in every worker's environment and children
// inherit. After every reap (a worker's or an orphan's exit), every
// child of the dispatcher that is not a worker is SIGKILLed (with its
// process group when it leads one) unless its WorkerPIDEnv names a worker
// that is still running: a setsid daemon of a live worker keeps running
// until its worker exits, for whatever reason (crash, restart, reload,
// scale down, stop). An orphan that does not say (its environment was
// replaced, or cannot be read) cannot be shown to belong to a live worker
// and is killed. When Run ends, every child left is killed and reaped.
// Killing an orphan reparents its own children to the dispatcher, and its
// exit brings the next reap, so a whole escaped tree goes, level by level.
//
// Per-worker cgroups, which would catch every process whatever its
// environment, come later (see the design notes).

// WorkerPIDEnv is the variable that names, in a worker's environment and
// in that of every process it starts, the worker's pid.
const WorkerPIDEnv = "COHORT_WORKER_PID"

// maxEnviron is how much of an orphan's /proc/PID/environ is read to find
// WorkerPIDEnv (the trampoline puts it first).
const maxEnviron = 64 << 10

// orphanState is the dispatcher's part in killing orphans; the loop owns
// it.
type orphanState struct {
	killed map[int]bool // SIGKILLed, not reaped yet
	kills  int          // orphans killed, for the log
}

// siginfoPID is si_pid of a SIGCHLD siginfo_t: after three ints, in a
// union aligned to a pointer.
func siginfoPID(info *unix.Siginfo) int {
	off := unsafe.Sizeof(uintptr(0)) * 2
	if off < 12 {
		off = 12
	}
	return int(*(*int32)(unsafe.Add(unsafe.Pointer(info), off)))
}

// setSubreaper makes this process a child subreaper.
func setSubreaper() error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", err)
	}
	return nil
}

// reapAll collects every exited child when the dispatcher owns all of
// the process's children (Options.Subreaper): workers go through the
// state machine, orphans are just reaped. Like reap, it kills what is
// left of a worker's process group before reaping the worker.
func (d *dispatcher) reapAll() {
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
		pid := siginfoPID(&info)
		if err != nil || info.Signo == 0 || pid <= 0 {
			break
		}
		w := d.procs[pid]
		if w != nil {
			unix.Kill(-pid, unix.SIGKILL)
		}
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		if err != nil || got != pid {
			break
		}
		if w != nil {
			d.transition(w, trExited, ws)
		} else {
			delete(d.orph.killed, pid)
		}
	}
	d.killOrphans(false)
}

// killOrphans SIGKILLs every child of the dispatcher that is not a
// worker, unless (all false) it says it belongs to a live worker.
func (d *dispatcher) killOrphans(all bool) int {
	n := 0
	for _, pid := range procfs.Children() {
		if d.procs[pid] != nil {
			continue
		}
		if !all {
			if owner := orphanOwner(pid); owner > 0 && d.procs[owner] != nil {
				continue
			}
		}
		if d.orph.killed[pid] {
			continue // already killed; not reaped yet
		}
		d.orph.killed[pid] = true
		target := pid
		if pgid, err := unix.Getpgid(pid); err == nil && pgid == pid {
			target = -pid
		}
		unix.Kill(target, unix.SIGKILL)
		n++
		d.orph.kills++
	}
	return n
}

// endOrphans kills and reaps every child left when Run ends, for at most
// timeout: escaped processes of workers that ended, and whatever they
// forked meanwhile.
func (d *dispatcher) endOrphans(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for {
		clear(d.orph.killed)
		d.killOrphans(true)
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err != nil || pid <= 0 {
				break
			}
		}
		if len(procfs.Children()) == 0 {
			break
		}
		if time.Now().After(deadline) {
			d.out.warnf("%d processes escaped from the workers are still running after %s", len(procfs.Children()), timeout)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if d.orph.kills > 0 {
		d.out.infof("killed %d processes left behind by workers that ended", d.orph.kills)
	}
}

// orphanOwner is the worker pid that pid's environment names, 0 when it
// names none or cannot be read.
func orphanOwner(pid int) int {
	v, ok := procfs.EnvValue(pid, WorkerPIDEnv, maxEnviron)
	if !ok {
		return 0
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0
	}
	return n
}

// SetSubreaper makes the calling process a child subreaper
// (PR_SET_CHILD_SUBREAPER): processes left by its descendants are
// reparented to it instead of to init. See EndChildren.
func SetSubreaper() error { return setSubreaper() }

// EndChildren SIGKILLs every child of the calling process (with its
// process group when it leads one) and reaps them, over and over as
// their own children are reparented, until none is left or timeout
// passes. It returns how many were killed. It is for a subreaper whose
// job is done (cohort run's parent once the dispatcher has exited); the
// caller must own every child of the process.
func EndChildren(timeout time.Duration) int {
	deadline := time.Now().Add(timeout)
	killed := map[int]bool{}
	for {
		kids := procfs.Children()
		for _, pid := range kids {
			if killed[pid] {
				continue
			}
			killed[pid] = true
			target := pid
			if pgid, err := unix.Getpgid(pid); err == nil && pgid == pid {
				target = -pid
			}
			unix.Kill(target, unix.SIGKILL)
		}
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err != nil || pid <= 0 {
				break
			}
		}
		if len(kids) == 0 || time.Now().After(deadline) {
			return len(killed)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
