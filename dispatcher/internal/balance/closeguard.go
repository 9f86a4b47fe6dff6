package balance

// The close guard: the backstop for a close that waits.
//
// rr.Conn.Close turns a worker's SO_LINGER off before it closes the
// dispatcher's copy of a connection, so that the close never waits for
// the client. A hostile worker still holds its own copy then, and can set
// a linger time again and close its copy between that check and the
// dispatcher's close: the dispatcher's close is the last, and the kernel
// makes it wait, in sk_stream_wait_close, until the client has
// acknowledged everything or the linger time (up to years) runs out.
// With the client in the worker's hands too, an event loop (or the
// flusher) would stop for that long: no connection accepted, no ACK read.
//
// No flag or call closes that window: the worker shares the socket (one
// file description, sent with SCM_RIGHTS) and may change its options at
// any time. But the wait is interruptible: a signal ends it, the close
// returns, and the kernel goes on delivering what is queued, as for any
// close. So the watcher looks, once per closeGuardEvery, at the system
// calls the dispatcher's threads are blocked in (probe.Blocked, from
// /proc/self/task/*/syscall: no cost on the way of a connection), and a
// thread found blocked in close(2) of the same fd at two looks in a row,
// which a close that does not wait never is, gets SIGURG: the signal the
// Go runtime itself sends threads to preempt them, which every Go program
// handles and ignores when it did not ask for it. A close so ended waited
// less than two closeGuardEvery.
//
// That would still let the worker stop a loop for that long once per
// connection it is given. So when a loop's close waited, the worker whose
// channel that loop was draining (the one that acknowledged or rejected
// the connection) is named, and the watcher takes its channel back and
// reports it like a worker past ack_timeout: the supervisor stops it
// and restarts its slot under the app's restart policy. For the guard to
// work at all, nothing closes a connection while holding a lock the
// watcher takes (the balancer's, a Channel's): the watcher would wait
// behind the very close it is to end.

import (
	"os"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/internal/probe"
	"golang.org/x/sys/unix"
)

// closeGuardEvery is how often, at most, the guard looks: a close that
// waits is ended within two of it. A look reads one small /proc file per
// thread of the dispatcher (probe.BenchmarkBlockedSelf: about 150 µs for 6 threads here).
const closeGuardEvery = time.Second

// closeGuard is the watcher's: it finds and ends closes that wait.
type closeGuard struct {
	pid     int
	every   int            // watcher ticks per look
	apart   time.Duration  // between two looks
	ticks   int            // since the last look
	closing map[int]uint64 // tid → fd of the closes seen at the last look
	loops   []*loop
	drains  []drainSeen // what each loop was draining at the last look
	warnf   func(format string, args ...any)
}

// drainSeen is a loop's drain at one look: which worker's channel, and
// the how-manieth drain it was.
type drainSeen struct {
	w *worker
	n uint64
}

// newCloseGuard makes the guard of a watcher that ticks every tick, for
// the closes of loops (and of any other thread of the dispatcher).
func newCloseGuard(tick time.Duration, loops []*loop, warnf func(format string, args ...any)) *closeGuard {
	every := max(1, int(closeGuardEvery/tick)) // the watcher ticks at most every second: looks are 0.5–1 s apart
	return &closeGuard{pid: os.Getpid(), every: every, apart: time.Duration(every) * tick,
		loops: loops, drains: make([]drainSeen, len(loops)), warnf: warnf}
}

// tick is called on each of the watcher's ticks; every g.every ticks it
// looks. It returns the workers whose connections' closes it ended.
func (g *closeGuard) tick() []*worker {
	if g.ticks++; g.ticks < g.every {
		return nil
	}
	g.ticks = 0
	return g.look()
}

// look lists the threads blocked in close(2), and interrupts those that
// were blocked in a close of the same fd at the last look. When it
// interrupts any, it names the workers whose channels the loops had been
// draining, in one call, since the last look: a drain does not wait for
// anything but such a close (it reads without waiting, and nothing closes
// a connection holding the lock it takes), so the close was of a
// connection that worker acknowledged or rejected.
func (g *closeGuard) look() []*worker {
	stuck := make([]*worker, 0, len(g.loops))
	for i, l := range g.loops {
		now := drainSeen{w: l.draining.Load(), n: l.drains.Load()}
		if now.w != nil && now == g.drains[i] {
			stuck = append(stuck, now.w)
		}
		g.drains[i] = now
	}
	calls, err := probe.Blocked(g.pid)
	if err != nil {
		return nil // our own /proc: nothing to do about it but try again
	}
	was := g.closing
	g.closing = nil
	interrupted := false
	for _, c := range calls {
		if c.NR != unix.SYS_CLOSE {
			continue
		}
		fd := c.Args[0]
		if g.closing == nil {
			g.closing = map[int]uint64{}
		}
		g.closing[c.TID] = fd
		if prev, ok := was[c.TID]; !ok || prev != fd {
			continue
		}
		if err := unix.Tgkill(g.pid, c.TID, unix.SIGURG); err != nil {
			continue // the thread has ended
		}
		interrupted = true
		g.warnf("round-robin: thread %d waited over %s in the close of fd %d (a connection with SO_LINGER whose client does not read); interrupted it", c.TID, g.apart, int32(fd))
	}
	if !interrupted {
		return nil
	}
	return stuck
}
