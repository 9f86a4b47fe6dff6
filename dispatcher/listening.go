package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/internal/probe"
	"golang.org/x/sys/unix"
)

// ready = "listening": a worker counts as ready once it (or a process it
// forked) waits for connections on one of the sockets it was given, and
// has then stayed up for ready_settle. The sockets are the listeners in
// shared mode, the slot's own in reuseport mode, and the round-robin
// channel in round-robin mode (the worker reads connections from it).
// READY=1 does not count: it says what a program believes (gunicorn's
// master sends it before its workers accept), and programs whose READY=1
// is exact can have ready = "notify".
//
// The checks read /proc (internal/probe), so they run in one goroutine per
// starting worker, never on the supervision loop; the goroutine reports
// once, on probeCh, and ends when the worker leaves "starting" (its
// context is cancelled) or the dispatcher stops.

// Probe intervals: frequent at first (most programs listen within a
// second), then slower, so that a slow starter costs little. The look for
// children that accept (a scan of every /proc/PID/stat) is rarer still.
const (
	probeFirst    = 10 * time.Millisecond
	probeInterval = 100 * time.Millisecond
	probeChildren = 200 * time.Millisecond // for the first 2 s
	probeChildMax = time.Second            // then
)

// probeResult is what a worker's probe found: the worker waits on one of
// its sockets (found.PID != 0), or it cannot be inspected (err).
type probeResult struct {
	w     *worker
	found probe.Found
	err   error
}

// inodes returns the socket inodes of fds, for the probe's targets.
func inodes(fds []uintptr) ([]uint64, error) {
	out := make([]uint64, 0, len(fds))
	for _, fd := range fds {
		var st unix.Stat_t
		if err := unix.Fstat(int(fd), &st); err != nil {
			return nil, fmt.Errorf("fstat listener fd %d: %w", fd, err)
		}
		out = append(out, st.Ino)
	}
	return out, nil
}

// probeTargets are the sockets w waits on once it accepts.
// (its mode said which when it started).
func (d *dispatcher) probeTargets(w *worker) probe.Targets {
	return w.probe
}

// startProbe begins watching w, whose command was just exec'd, for
// ready = "listening". Without sockets to watch it settles at once.
func (d *dispatcher) startProbe(w *worker) {
	t := d.probeTargets(w)
	if len(t.Inodes) == 0 {
		d.out.infof("worker %d (pid %d) has no socket to watch; ready after ready_settle (%s)", w.slot.index, w.pid, d.app.ReadySettle)
		d.settle(w, time.Now())
		return
	}
	ctx, cancel := context.WithCancel(d.goCtx)
	w.endProbe = cancel
	pid := w.pid
	d.wg.Go(func() {
		timer := time.NewTimer(probeFirst)
		defer timer.Stop()
		started := time.Now()
		var lastTree time.Time
		for {
			select {
			case <-ctx.Done():
				return
			case <-timer.C:
			}
			every := probeChildren
			if time.Since(started) > 2*time.Second {
				every = probeChildMax
			}
			tree := time.Since(lastTree) >= every
			if tree {
				lastTree = time.Now()
			}
			found, err := probe.Accepting(ctx, pid, t, tree)
			if err != nil || found.PID != 0 {
				select {
				case d.probeCh <- probeResult{w: w, found: found, err: err}:
				case <-ctx.Done():
				}
				return
			}
			next := probeFirst
			if time.Since(started) > time.Second {
				next = probeInterval
			}
			timer.Reset(next)
		}
	})
}

// onProbe hands a probe's report to the state machine, unless the
// worker it is about has gone meanwhile.
func (d *dispatcher) onProbe(m probeResult) {
	w := m.w
	if d.procs[w.pid] != w || w.state != stStarting {
		return
	}
	switch {
	case errors.Is(m.err, probe.ErrNoAccess):
		d.out.warnf("worker %d (pid %d): ready = \"listening\" cannot see whether it accepts (%v); counting it ready after ready_settle (%s) — use ready = \"notify\" for programs that sd_notify", w.slot.index, w.pid, m.err, d.app.ReadySettle)
	case m.err != nil:
		d.out.warnf("worker %d (pid %d): ready = \"listening\": %v; counting it ready after ready_settle (%s)", w.slot.index, w.pid, m.err, d.app.ReadySettle)
	default:
		in := ""
		if m.found.PID != w.pid {
			in = fmt.Sprintf(" in its child pid %d", m.found.PID)
		}
		d.out.infof("worker %d (pid %d) accepts (%s%s) after %s", w.slot.index, w.pid, m.found.How, in, time.Since(w.started).Round(time.Millisecond))
	}
	d.transition(w, trListening, 0)
}

// settle starts w's settle window: it becomes ready after ready_settle
// unless it exits first (zero: ready now).
func (d *dispatcher) settle(w *worker, now time.Time) {
	w.stopProbe()
	if !w.readyAt.IsZero() {
		return // already settling
	}
	w.readyAt = now.Add(d.app.ReadySettle)
}
