package dispatcher

// Round-robin mode: the dispatcher accepts on every listener and hands each
// connection to a worker over that worker's round-robin channel
// (activation/rr, docs/protocol.md).
//
// Goroutines, all started on d.wg and ended by rrClose (or by their
// worker's exit):
//
//   - one acceptor per listener: waits until some ready worker has room,
//     accepts (accept4 on the listener's RawConn, drained until EAGAIN or
//     the room is used up) and dispatches;
//   - one receiver per worker channel: applies HELLO, ACK, CLOSED and
//     REJECT, and retires the channel when it ends (the worker closed it
//     or died, or the dispatcher shut it down), after reading every
//     message the worker sent before;
//   - one writer per worker channel: after a send found the worker's
//     queue full, waits until it has room again;
//   - one flusher: sends held connections when room appears. Receivers
//     never send themselves, so a worker that is slow to read can never
//     keep the dispatcher from reading that worker's acknowledgements;
//   - one watcher: takes the channel back from a worker that has left a
//     connection unacknowledged for ack_timeout.
//
// Sends never wait: a worker whose queue is full is skipped until its
// writer sees room, and what did not fit goes to the others. So a worker
// that stops reading cannot stop the acceptors, whatever max_pending is.
//
// Connections are "held" only between accept (or a worker's death or
// rejection) and the next free worker; acceptors stop accepting while
// anything is held or no ready worker has room, so the kernel's listen
// backlog holds the rest: nothing is buffered without bound.
//
// Taking connections back from a worker that still runs (it is too slow,
// or its channel broke) is a Shutdown of the channel: the worker can no
// longer acknowledge, the receiver reads the acknowledgements it sent in
// time, and only the rest goes to other workers, so no connection is
// served twice (the worker library serves nothing it could not
// acknowledge). Such a worker, and one whose channel ends while it should
// be serving, is reported to the loop, which stops it (stop_signal, then
// SIGKILL after stop_timeout) and so replaces it; it releases, when it
// exits, its copies of the connections that went to others. A worker
// that never sends a well-formed message gets one connection at a time
// and, when it fails that one or ends, the log says it never spoke the
// protocol.

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"github.com/cohort-dev/cohort/appfile"
	"golang.org/x/sys/unix"
)

// roundRobin is the state of round-robin mode. Fields under mu are shared by
// the acceptors, the receivers, the writers, the watcher and the loop; the
// others belong to the loop.
type roundRobin struct {
	out         *output
	maxPending  int
	leastConns  bool
	maxHandoffs int // a connection handed back this often is closed
	ackTimeout  time.Duration

	ctx       context.Context // cancelled by rrClose
	cancel    context.CancelFunc
	listeners []*os.File // non-blocking duplicates of the app's listeners, owned here
	env       []string   // what workers get besides LISTEN_*: COHORT_RR_LISTENERS, COHORT_RR_HELLO

	byPID  map[int]*rrWorker // loop only: until reaped and its channel retired
	silent map[int]bool      // loop only: slots whose last worker never spoke

	faultCh chan struct{} // capacity 1: faults wait for the loop

	mu       sync.Mutex
	workers  []*rrWorker // live channels, in start order
	next     int         // round-robin cursor into workers
	held     []rr.Conn   // accepted or returned, not yet sent
	nextID   uint64
	handoffs map[uint64]int // times each connection still in flight was handed back
	faults   []rrFault      // for the loop
	space    chan struct{}  // closed (and replaced) when room may have appeared
	kick     chan struct{}  // wakes the flusher; buffered, never closed
	waiting  bool           // an acceptor waits on space
	closed   bool
	refused  int // sends refused with ETOOMANYREFS, for the log
}

// rrWorker is one worker process's channel.
type rrWorker struct {
	ch     *rr.Channel
	pid    int
	index  int
	endIno uint64        // the worker's end of the channel, for ready = "listening"
	wake   chan struct{} // capacity 1: the writer should wait for room
	done   chan struct{} // closed by retire: the writer ends

	// Under roundRobin.mu.
	ready     bool   // the worker is in state ready and the dispatcher not stopping
	gone      bool   // retired: the channel is closed or closing
	revoked   bool   // the channel was shut down: the receiver drains it, then retires it
	revokeWhy string // why, for the loop ("" when the worker was reaped)
	blocked   bool   // its queue was full: skipped until the writer sees room
	pause     bool   // blocked by ETOOMANYREFS: the writer waits a moment instead
	spoke     bool   // it sent a well-formed message
	sending   int    // connections picked for it whose TrySend has not returned
	handed    uint64 // connections sent to it, for status
	ignored   uint64 // ids it sent that the channel did not apply

	// Loop only.
	drained bool // the dispatcher took it out of rotation to stop it (reload, restart-worker)
	reaped  bool
	ended   bool // its receiver retired the channel
	spokeOK bool // seen to have spoken (clears its slot's mark in the status line)
	named   bool // logged as never having spoken
}

// rrFault is something a worker did on its channel that the loop acts on.
type rrFault struct {
	pid    int
	why    string // "did not acknowledge …", "closed its round-robin channel", …
	ended  bool   // the receiver has retired the channel
	silent bool   // the worker never sent a well-formed message
}

// tooManyRefsPause is how long a worker is skipped after sendmsg failed
// with ETOOMANYREFS (too many fds in flight for the dispatcher's
// RLIMIT_NOFILE): acknowledgements have to bring the number down.
const tooManyRefsPause = 10 * time.Millisecond

// rrStart switches the dispatcher to round-robin mode when the app asks for
// it: workers get a channel instead of the listeners, and one acceptor per
// listener starts. It is called once, before the first spawn.
func (d *dispatcher) rrStart() error {
	if d.app.Mode != appfile.ModeRoundRobin {
		return nil
	}
	ctx, cancel := context.WithCancel(d.goCtx)
	ackTimeout := d.app.AckTimeout
	if ackTimeout <= 0 {
		ackTimeout = appfile.DefaultAckTimeout
	}
	r := &roundRobin{
		out:         d.out,
		maxPending:  max(1, d.app.MaxPending),
		leastConns:  d.app.Balance == appfile.BalanceLeastConnections,
		maxHandoffs: 2 * len(d.slots),
		ackTimeout:  ackTimeout,
		ctx:         ctx,
		cancel:      cancel,
		byPID:       map[int]*rrWorker{},
		silent:      map[int]bool{},
		faultCh:     make(chan struct{}, 1),
		handoffs:    map[uint64]int{},
		space:       make(chan struct{}),
		kick:        make(chan struct{}, 1),
	}
	d.rr = r
	for i, f := range d.opt.Listeners {
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("listener %s: dup: %w", f.Name(), err)
		}
		// O_NONBLOCK is shared with every copy of the socket (systemd's
		// too); nobody else accepts on it in this mode.
		if err := unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
			return fmt.Errorf("listener %s: set non-blocking: %w", f.Name(), err)
		}
		r.listeners = append(r.listeners, os.NewFile(uintptr(fd), d.app.Listen[i].Name))
	}
	r.env = []string{rr.ListenersEnv + "=" + d.listenNames, rr.HelloEnv + "=1"}
	d.listenFDs, d.listenNames = nil, rr.FDName
	d.wg.Go(r.flusher)
	d.wg.Go(r.watch)
	for i, f := range r.listeners {
		d.wg.Go(func() { r.accept(i, f) })
	}
	return nil
}

// rrEnv is what a worker's environment needs in round-robin mode beyond
// LISTEN_FDS: COHORT_RR_LISTENERS and COHORT_RR_HELLO; nothing in the
// other modes.
func (d *dispatcher) rrEnv() []string {
	if d.rr == nil {
		return nil
	}
	return d.rr.env
}

// rrDrain takes w out of the rotation at once, before the state machine
// moves it to draining: nothing new is sent to it; what it has not
// acknowledged yet stays with it until it acknowledges, rejects, or closes
// its channel, or ack_timeout passes (then it goes to another worker).
func (d *dispatcher) rrDrain(w *worker) {
	r := d.rr
	if r == nil {
		return
	}
	if rw := r.byPID[w.pid]; rw != nil {
		rw.drained = true
		r.mu.Lock()
		rw.ready = false
		r.mu.Unlock()
	}
}

// forkWorker is fork, with a fresh round-robin channel at fd 3 in
// round-robin mode. The dispatcher keeps the other end for the worker's
// life.
func (d *dispatcher) forkWorker(s *slot) (pid int, outR, statusR *os.File, err error) {
	r := d.rr
	if r == nil {
		return d.fork(s)
	}
	ch, end, err := rr.NewPair()
	if err != nil {
		return 0, nil, nil, fmt.Errorf("round-robin channel: %w", err)
	}
	endIno := fileInode(end) // ready = "listening" watches the worker's end
	d.listenFDs = []uintptr{end.Fd()}
	pid, outR, statusR, err = d.fork(s)
	d.listenFDs = nil
	end.Close() // the worker has its copy
	if err != nil {
		ch.Close() // nothing was sent on it
		return 0, nil, nil, err
	}
	w := &rrWorker{ch: ch, pid: pid, index: s.index, endIno: endIno, wake: make(chan struct{}, 1), done: make(chan struct{})}
	r.byPID[pid] = w
	r.mu.Lock()
	r.workers = append(r.workers, w)
	r.mu.Unlock()
	d.wg.Go(func() { r.receive(w) })
	d.wg.Go(func() { r.writer(w) })
	return pid, outR, statusR, nil
}

// rrSync brings the balancer up to date with the state machine: only
// workers in state ready receive connections, none while stopping, and a
// reaped worker's channel is shut down (its receiver reads what the
// worker sent last, then hands what it had not acknowledged to others).
// The loop calls it after every event.
func (d *dispatcher) rrSync() {
	r := d.rr
	if r == nil {
		return
	}
	var gone []*rrWorker
	changed := false
	r.mu.Lock()
	for pid, w := range r.byPID {
		p := d.procs[pid]
		ready := p != nil && p.state == stReady && !d.stopping
		if w.ready != ready {
			w.ready, changed = ready, true
		}
		if w.spoke && !w.spokeOK {
			w.spokeOK = true
			delete(r.silent, w.index)
		}
		if p == nil && !w.reaped {
			w.reaped = true
			gone = append(gone, w)
		}
		if w.reaped && w.ended {
			delete(r.byPID, pid)
		}
	}
	if changed {
		r.wakeLocked()
	}
	r.mu.Unlock()
	for _, w := range gone {
		r.revoke(w, "")
	}
	if changed {
		r.flushLater()
	}
}

// rrFaults is what the loop waits on for rrOnFaults; nil (never ready)
// outside round-robin mode.
func (d *dispatcher) rrFaults() <-chan struct{} {
	if d.rr == nil {
		return nil
	}
	return d.rr.faultCh
}

// rrOnFaults acts on what workers did wrong on their channels: a worker
// that should be serving and left a connection unacknowledged for
// ack_timeout, or whose channel ended or broke, is marked unhealthy and
// stopped (its slot restarts it when it has exited); a worker that never
// said a word on its channel is named in the log, with the remedy.
func (d *dispatcher) rrOnFaults() {
	r := d.rr
	r.mu.Lock()
	faults := r.faults
	r.faults = nil
	r.mu.Unlock()
	if len(faults) == 0 {
		return
	}
	d.reap() // a channel that ended often means the worker exited: say that instead
	for _, f := range faults {
		rw := r.byPID[f.pid]
		if rw == nil {
			continue
		}
		if f.ended {
			rw.ended = true
		}
		w := d.procs[f.pid]
		switch {
		case d.stopping:
		case w != nil && (w.state == stStarting || w.state == stReady):
			if f.silent {
				d.rrNeverSpoke(rw)
			}
			d.out.warnf("worker %d (pid %d) %s; stopping it (what it did not acknowledge goes to the other workers)", w.slot.index, w.pid, f.why)
			w.unhealthy, w.silent = f.why, f.silent
			d.transition(w, trUnhealthy, 0)
		case w == nil && f.ended && f.silent && !rw.drained:
			d.rrNeverSpoke(rw) // it exited without a word
		}
		if rw.reaped && rw.ended {
			delete(r.byPID, f.pid)
		}
	}
}

// rrNeverSpoke logs that a worker never spoke the protocol, once per
// worker, and marks its slot for the status line until a worker of the
// slot speaks.
func (d *dispatcher) rrNeverSpoke(rw *rrWorker) {
	if rw.named {
		return
	}
	rw.named = true
	d.rr.silent[rw.index] = true
	d.out.warnf("worker %d never spoke the round-robin protocol (docs/protocol.md); for programs without cohort's library use mode = \"shared\" or \"reuseport\"", rw.index)
}

// rrCounts is what status shows of the worker pid in round-robin mode:
// how many connections were sent to it, and how many of those it holds
// (not yet acknowledged, or acknowledged and not yet closed). Zero outside
// round-robin mode.
func (d *dispatcher) rrCounts(pid int) (handed uint64, active int) {
	r := d.rr
	if r == nil {
		return 0, 0
	}
	w := r.byPID[pid]
	if w == nil {
		return 0, 0
	}
	r.mu.Lock()
	handed = w.handed
	r.mu.Unlock()
	return handed, w.ch.Unacked() + w.ch.Open()
}

// rrStatus is the round-robin part of the STATUS= line: slots whose
// worker never spoke the protocol, and workers being replaced as
// unhealthy.
func (d *dispatcher) rrStatus() string {
	r := d.rr
	if r == nil || d.stopping {
		return ""
	}
	var b strings.Builder
	var silent, sick []int
	for _, s := range d.slots {
		if r.silent[s.index] {
			silent = append(silent, s.index)
		}
	}
	for _, w := range d.procs {
		if w.unhealthy != "" && !w.silent {
			sick = append(sick, w.slot.index)
		}
	}
	slices.Sort(sick)
	if len(silent) > 0 {
		fmt.Fprintf(&b, " · round-robin protocol never spoken: worker%s %s", plural(len(silent)), joinInts(silent))
	}
	if len(sick) > 0 {
		fmt.Fprintf(&b, " · unhealthy: worker%s %s", plural(len(sick)), joinInts(slices.Compact(sick)))
	}
	return b.String()
}

func joinInts(ns []int) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = fmt.Sprint(n)
	}
	return strings.Join(s, ",")
}

// rrClose ends round-robin mode: acceptors stop, every channel is closed and
// every connection still held is closed (its client sees a reset). It is
// called once every worker has been reaped, before d.wg.Wait.
func (d *dispatcher) rrClose() {
	r := d.rr
	if r == nil {
		return
	}
	r.cancel()
	for _, f := range r.listeners {
		f.Close() // wakes an acceptor blocked in RawConn.Read
	}
	r.mu.Lock()
	r.closed = true
	workers, held := r.workers, r.held
	r.workers, r.held = nil, nil
	r.mu.Unlock()
	for _, w := range workers {
		left, _ := w.ch.Close()
		closeConns(left)
	}
	closeConns(held)
}

// accept is listener index's acceptor.
func (r *roundRobin) accept(index int, f *os.File) {
	rc, err := f.SyscallConn()
	if err != nil {
		r.out.warnf("listener %s: %v; not accepting on it", f.Name(), err)
		return
	}
	batch := make([]rr.Conn, 0, rr.MaxFDs)
	var failures int
	for {
		room := r.waitRoom()
		if room == 0 {
			return
		}
		room = min(room, rr.MaxFDs)
		batch = batch[:0]
		var aerr error
		err := rc.Read(func(fd uintptr) bool {
			for len(batch) < room {
				nfd, err := accept4(fd)
				switch err {
				case 0:
					batch = append(batch, rr.Conn{Listener: uint16(index), File: os.NewFile(nfd, "conn")})
					continue
				case unix.EAGAIN:
					return len(batch) > 0 // nothing at all: wait for the poller
				case unix.EINTR, unix.ECONNABORTED, unix.EPROTO:
					continue
				}
				aerr = err
				return true
			}
			return true
		})
		if len(batch) > 0 {
			r.dispatch(batch)
		}
		if err != nil { // the listener was closed: rrClose
			return
		}
		if aerr != nil {
			// EMFILE, ENFILE, ENOBUFS…: the connections wait in the
			// backlog; retry after a pause instead of spinning.
			failures++
			if failures&(failures-1) == 0 {
				r.out.warnf("accept on %s: %v (%d times so far); retrying", f.Name(), aerr, failures)
			}
			select {
			case <-time.After(50 * time.Millisecond):
			case <-r.ctx.Done():
				return
			}
		}
	}
}

// accept4 accepts one connection on the listening socket fd, close-on-exec
// and without asking for the peer's address. The connection is left in
// blocking mode: os.NewFile then keeps it out of the dispatcher's
// netpoller (which would watch, for nothing, every connection until the
// worker acknowledges it), and the worker sets the mode it wants, as
// net.FileConn and Python's socket timeouts do.
func accept4(fd uintptr) (uintptr, unix.Errno) {
	nfd, _, errno := unix.Syscall6(unix.SYS_ACCEPT4, fd, 0, 0, unix.SOCK_CLOEXEC, 0, 0)
	return nfd, errno
}

// waitRoom waits until ready workers can take more connections than are
// held and returns how many; 0 means round-robin mode is ending.
func (r *roundRobin) waitRoom() int {
	for {
		r.mu.Lock()
		n := r.roomLocked()
		space := r.space
		if n == 0 {
			r.waiting = true
		}
		r.mu.Unlock()
		if n > 0 {
			return n
		}
		select {
		case <-space:
		case <-r.ctx.Done():
			return 0
		}
	}
}

func (r *roundRobin) roomLocked() int {
	if r.closed {
		return 0
	}
	n := -len(r.held)
	for _, w := range r.workers {
		if r.usableLocked(w) {
			n += max(0, r.limitLocked(w)-r.loadLocked(w))
		}
	}
	return max(0, n)
}

// usableLocked reports whether w may be sent connections now.
func (r *roundRobin) usableLocked(w *rrWorker) bool {
	return w.ready && !w.gone && !w.revoked && !w.blocked
}

// limitLocked is how many unacknowledged connections w may have:
// max_pending, or one while it has not spoken (a program that ignores
// its channel strands one connection, for ack_timeout, not max_pending).
func (r *roundRobin) limitLocked(w *rrWorker) int {
	if !w.spoke {
		return 1
	}
	return r.maxPending
}

// loadLocked is how many connections w has not acknowledged yet, counting
// those being sent to it.
func (r *roundRobin) loadLocked(w *rrWorker) int { return w.sending + w.ch.Unacked() }

// wakeLocked tells waiting acceptors that room may have appeared.
func (r *roundRobin) wakeLocked() {
	if r.waiting {
		close(r.space)
		r.space, r.waiting = make(chan struct{}), false
	}
}

// dispatch numbers freshly accepted connections and sends them on.
func (r *roundRobin) dispatch(conns []rr.Conn) {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		closeConns(conns)
		return
	}
	for i := range conns {
		r.nextID++
		conns[i].ID = r.nextID
	}
	r.held = append(r.held, conns...)
	r.mu.Unlock()
	r.flush()
}

// requeue takes back connections a worker did not take (it rejected them,
// died, closed its channel or was too slow) and sends them to other
// workers, before anything accepted later.
func (r *roundRobin) requeue(conns []rr.Conn) {
	if len(conns) == 0 {
		return
	}
	r.mu.Lock()
	r.requeueLocked(conns, true)
	r.mu.Unlock()
	r.flushLater()
}

// requeueLocked puts conns at the head of what is held. A connection that
// a worker had been given (handedBack) and that comes back more than
// maxHandoffs times is closed: no worker takes it, or it kills the ones
// that do.
func (r *roundRobin) requeueLocked(conns []rr.Conn, handedBack bool) {
	if r.closed {
		closeConns(conns)
		return
	}
	keep := make([]rr.Conn, 0, len(conns)+len(r.held))
	for _, c := range conns {
		if handedBack {
			r.handoffs[c.ID]++
			if r.handoffs[c.ID] > r.maxHandoffs {
				delete(r.handoffs, c.ID)
				r.out.warnf("connection %d came back from a worker %d times (rejected, not acknowledged, or its worker died; does any worker serve listener %d?); closed it", c.ID, r.maxHandoffs+1, c.Listener)
				c.File.Close()
				continue
			}
		}
		keep = append(keep, c)
	}
	r.held = append(keep, r.held...)
}

// flushLater has the flusher goroutine send what is held.
func (r *roundRobin) flushLater() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// flusher runs flush whenever kicked, until round-robin mode ends.
func (r *roundRobin) flusher() {
	for {
		select {
		case <-r.kick:
			r.flush()
		case <-r.ctx.Done():
			return
		}
	}
}

// flush sends held connections to workers with room until nothing is held
// or no worker has room. It never waits for a worker: what does not fit
// in a worker's queue goes back to the head of what is held, and that
// worker is skipped until its writer sees room.
func (r *roundRobin) flush() {
	type batch struct {
		w     *rrWorker
		conns []rr.Conn
	}
	for {
		var plan []batch
		r.mu.Lock()
		for len(r.held) > 0 && !r.closed {
			w := r.pickLocked()
			if w == nil {
				break
			}
			c := r.held[0]
			r.held[0] = rr.Conn{}
			r.held = r.held[1:]
			w.sending++
			i := 0
			for i < len(plan) && plan[i].w != w {
				i++
			}
			if i == len(plan) {
				plan = append(plan, batch{w: w})
			}
			plan[i].conns = append(plan[i].conns, c)
		}
		r.mu.Unlock()
		if len(plan) == 0 {
			return
		}
		for _, b := range plan {
			n, err := b.w.ch.TrySend(b.conns...)
			broken, refused := false, 0
			r.mu.Lock()
			b.w.sending -= len(b.conns)
			b.w.handed += uint64(n)
			if err != nil {
				switch {
				case errors.Is(err, rr.ErrWouldBlock), errors.Is(err, unix.ETOOMANYREFS):
					b.w.blocked = true
					b.w.pause = errors.Is(err, unix.ETOOMANYREFS)
					if b.w.pause {
						r.refused++
						refused = r.refused
					}
					select {
					case b.w.wake <- struct{}{}:
					default:
					}
				case errors.Is(err, rr.ErrNotSent):
					// Retired or shut down meanwhile.
				default:
					broken = true
				}
				// They never reached the worker: no handoff.
				r.requeueLocked(b.conns[n:], false)
			}
			r.mu.Unlock()
			if refused&(refused-1) == 0 && refused > 0 {
				r.out.warnf("round-robin: sending to worker %d: %v (%d times so far; raise LimitNOFILE= or lower max_pending)", b.w.index, err, refused)
			}
			if broken {
				r.revoke(b.w, fmt.Sprintf("broke its round-robin channel (%v)", err))
			}
		}
	}
}

// pickLocked chooses the worker for the next connection, or nil when no
// ready worker has room.
func (r *roundRobin) pickLocked() *rrWorker {
	n := len(r.workers)
	var best *rrWorker
	bestLoad, bestAt := 0, 0
	for i := range n {
		at := (r.next + i) % n
		w := r.workers[at]
		if !r.usableLocked(w) {
			continue
		}
		unacked := r.loadLocked(w)
		if unacked >= r.limitLocked(w) {
			continue
		}
		if !r.leastConns {
			best, bestAt = w, at
			break
		}
		if load := unacked + w.ch.Open(); best == nil || load < bestLoad {
			best, bestLoad, bestAt = w, load, at
		}
	}
	if best != nil {
		r.next = (bestAt + 1) % n
	}
	return best
}

// writer waits, each time a send found w's queue full, until it has room
// again, then puts w back into the rotation.
func (r *roundRobin) writer(w *rrWorker) {
	for {
		select {
		case <-w.wake:
		case <-w.done:
			return
		case <-r.ctx.Done():
			return
		}
		r.mu.Lock()
		pause := w.pause
		r.mu.Unlock()
		var err error
		if pause {
			t := time.NewTimer(tooManyRefsPause)
			select {
			case <-t.C:
			case <-w.done:
				t.Stop()
				return
			case <-r.ctx.Done():
				t.Stop()
				return
			}
		} else {
			err = w.ch.WaitWritable() // returns when the channel is shut down or closed, too
		}
		r.mu.Lock()
		w.blocked, w.pause = false, false
		r.wakeLocked()
		r.mu.Unlock()
		r.flushLater()
		if err != nil {
			return
		}
	}
}

// watch takes the channel back from every worker that has left a
// connection unacknowledged for ack_timeout, and reports it to the loop.
func (r *roundRobin) watch() {
	every := min(max(r.ackTimeout/4, 10*time.Millisecond), time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-r.ctx.Done():
			return
		}
		now := time.Now()
		var late []*rrWorker
		var silent []bool
		r.mu.Lock()
		for _, w := range r.workers {
			if w.gone || w.revoked {
				continue
			}
			if at := w.ch.Oldest(); !at.IsZero() && now.Sub(at) >= r.ackTimeout {
				late = append(late, w)
				silent = append(silent, !w.spoke)
			}
		}
		r.mu.Unlock()
		for i, w := range late {
			why := fmt.Sprintf("left a connection unacknowledged for ack_timeout (%s)", r.ackTimeout)
			if r.revoke(w, why) {
				r.fault(rrFault{pid: w.pid, why: why, silent: silent[i]})
			}
		}
	}
}

// revoke shuts w's channel down, once: nothing more is sent to it, its
// receiver reads what it sent before and then retires the channel,
// handing the rest to other workers. why is passed on to the loop when
// the channel has ended. It reports whether this call shut it down.
func (r *roundRobin) revoke(w *rrWorker, why string) bool {
	r.mu.Lock()
	if w.revoked || w.gone {
		r.mu.Unlock()
		return false
	}
	w.revoked, w.revokeWhy = true, why
	r.mu.Unlock()
	if err := w.ch.Shutdown(); err != nil {
		r.out.warnf("worker %d (pid %d): %v", w.index, w.pid, err)
	}
	return true
}

// fault hands f to the loop without waiting for it.
func (r *roundRobin) fault(f rrFault) {
	r.mu.Lock()
	r.faults = append(r.faults, f)
	r.mu.Unlock()
	select {
	case r.faultCh <- struct{}{}:
	default:
	}
}

// receive reads w's channel until it ends, then retires w and tells the
// loop.
func (r *roundRobin) receive(w *rrWorker) {
	for {
		ev, err := w.ch.Recv()
		if err != nil {
			r.mu.Lock()
			closing := r.closed
			revoked, why, spoke := w.revoked, w.revokeWhy, w.spoke
			r.mu.Unlock()
			if !revoked {
				why = "closed its round-robin channel"
				if !errors.Is(err, net.ErrClosed) {
					why = fmt.Sprintf("broke its round-robin channel (%v)", err)
				}
			}
			r.retire(w)
			if !closing {
				r.fault(rrFault{pid: w.pid, why: why, ended: true, silent: !spoke})
			}
			return
		}
		r.mu.Lock()
		first := !w.spoke
		w.spoke = true
		if first {
			r.wakeLocked() // its limit grows from 1 to max_pending
		}
		prevIgnored := w.ignored
		w.ignored += uint64(ev.Ignored)
		ignored := w.ignored
		held := len(r.held) > 0
		switch ev.Type {
		case rr.TypeReject:
			r.wakeLocked()
			r.requeueLocked(ev.Rejected, true)
			held = true
		case rr.TypeAck:
			if len(r.handoffs) > 0 {
				for _, id := range ev.IDs {
					delete(r.handoffs, id)
				}
			}
			r.wakeLocked()
		}
		r.mu.Unlock()
		if bits.Len64(ignored) != bits.Len64(prevIgnored) { // past 1, 2, 4, 8…: log without flooding
			r.out.warnf("worker %d (pid %d) sent %v for %d ids it does not hold; ignored (%d so far)", w.index, w.pid, ev.Type, ev.Ignored, ignored)
		}
		if held || first {
			r.flushLater()
		}
	}
}

// retire stops using w's channel and hands every connection it had not
// acknowledged to other workers. It may be called more than once.
func (r *roundRobin) retire(w *rrWorker) {
	r.mu.Lock()
	if !w.gone {
		w.gone = true
		close(w.done)
		for i, x := range r.workers {
			if x == w {
				r.workers = append(r.workers[:i], r.workers[i+1:]...)
				if r.next > i {
					r.next--
				}
				break
			}
		}
		if len(r.workers) > 0 {
			r.next %= len(r.workers)
		} else {
			r.next = 0
		}
	}
	closing := r.closed
	r.mu.Unlock()
	left, _ := w.ch.Close()
	if len(left) > 0 && !closing {
		r.out.infof("worker %d (pid %d): %d connections it had not acknowledged go to other workers", w.index, w.pid, len(left))
	}
	r.requeue(left)
}

func closeConns(conns []rr.Conn) {
	for _, c := range conns {
		c.File.Close()
	}
}
