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
//   - one receiver per worker channel: applies ACK, CLOSED and REJECT, and
//     retires the channel when the worker closes it or dies;
//   - one flusher: sends held connections when room appears. Receivers
//     never send themselves, so a worker that is slow to read can never
//     keep the dispatcher from reading that worker's acknowledgements.
//
// Connections are "held" only between accept (or a worker's death or
// rejection) and the next free worker; acceptors stop accepting while
// anything is held or no ready worker has room, so the kernel's listen
// backlog holds the rest: nothing is buffered without bound.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"github.com/cohort-dev/cohort/generator/config"
	"golang.org/x/sys/unix"
)

// roundRobin is the state of round-robin mode. Fields under mu are shared by
// the acceptors, the receivers and the loop; the others belong to the loop.
type roundRobin struct {
	out        *output
	maxPending int
	leastConns bool
	maxRejects int // a connection rejected this often is closed

	ctx       context.Context // cancelled by rrClose
	cancel    context.CancelFunc
	listeners []*os.File // non-blocking duplicates of the app's listeners, owned here
	env       []string   // what workers get besides LISTEN_*: COHORT_RR_LISTENERS

	byPID map[int]*rrWorker // loop only

	mu      sync.Mutex
	workers []*rrWorker // live channels, in start order
	next    int         // round-robin cursor into workers
	held    []rr.Conn   // accepted or returned, not yet sent
	nextID  uint64
	rejects map[uint64]int // rejections per connection id still in flight
	space   chan struct{}  // closed (and replaced) when room may have appeared
	kick    chan struct{}  // wakes the flusher; buffered, never closed
	waiting bool           // an acceptor waits on space
	closed  bool
}

// rrWorker is one worker process's channel.
type rrWorker struct {
	ch     *rr.Channel
	pid    int
	index  int
	endIno uint64 // the worker's end of the channel, for ready = "listening"

	// Under roundRobin.mu.
	ready   bool // the worker is in state ready and the dispatcher not stopping
	gone    bool // retired: the channel is closed or closing
	sending int  // connections picked for it whose Send has not returned
}

// rrStart switches the dispatcher to round-robin mode when the app asks for
// it: workers get a channel instead of the listeners, and one acceptor per
// listener starts. It is called once, before the first spawn.
func (d *dispatcher) rrStart() error {
	if d.app.Mode != config.ModeRoundRobin {
		return nil
	}
	ctx, cancel := context.WithCancel(d.goCtx)
	r := &roundRobin{
		out:        d.out,
		maxPending: max(1, d.app.MaxPending),
		leastConns: d.app.Balance == config.BalanceLeastConnections,
		maxRejects: 2 * len(d.slots),
		ctx:        ctx,
		cancel:     cancel,
		byPID:      map[int]*rrWorker{},
		rejects:    map[uint64]int{},
		space:      make(chan struct{}),
		kick:       make(chan struct{}, 1),
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
	r.env = []string{rr.ListenersEnv + "=" + d.listenNames}
	d.listenFDs, d.listenNames = nil, rr.FDName
	d.wg.Go(r.flusher)
	for i, f := range r.listeners {
		d.wg.Go(func() { r.accept(i, f) })
	}
	return nil
}

// rrEnv is what a worker's environment needs in round-robin mode beyond
// LISTEN_FDS: COHORT_RR_LISTENERS; nothing in shared mode.
func (d *dispatcher) rrEnv() []string {
	if d.rr == nil {
		return nil
	}
	return d.rr.env
}

// rrDrain takes w out of the rotation at once, before the state machine
// moves it to draining: nothing new is sent to it; what it has not
// acknowledged yet stays with it until it acknowledges, rejects, or closes
// its channel (then it goes to another worker).
func (d *dispatcher) rrDrain(w *worker) {
	r := d.rr
	if r == nil {
		return
	}
	if rw := r.byPID[w.pid]; rw != nil {
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
	w := &rrWorker{ch: ch, pid: pid, index: s.index, endIno: endIno}
	r.byPID[pid] = w
	r.mu.Lock()
	r.workers = append(r.workers, w)
	r.mu.Unlock()
	d.wg.Go(func() { r.receive(w) })
	return pid, outR, statusR, nil
}

// rrSync brings the balancer up to date with the state machine: only
// workers in state ready receive connections, none while stopping, and a
// reaped worker's channel is retired (its unacknowledged connections go to
// others). The loop calls it after every event.
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
		if p == nil {
			delete(r.byPID, pid)
			gone = append(gone, w)
		}
	}
	if changed {
		r.wakeLocked()
	}
	r.mu.Unlock()
	for _, w := range gone {
		r.retire(w)
	}
	if changed {
		r.flushLater()
	}
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
		if w.ready && !w.gone {
			n += max(0, r.maxPending-r.loadLocked(w))
		}
	}
	return max(0, n)
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
// died or closed its channel) and sends them to other workers, before
// anything accepted later.
func (r *roundRobin) requeue(conns []rr.Conn, rejected bool) {
	if len(conns) == 0 {
		return
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		closeConns(conns)
		return
	}
	keep := make([]rr.Conn, 0, len(conns)+len(r.held))
	for _, c := range conns {
		if rejected {
			r.rejects[c.ID]++
			if r.rejects[c.ID] > r.maxRejects {
				delete(r.rejects, c.ID)
				r.out.warnf("connection %d was rejected %d times (does any worker serve listener %d?); closed it", c.ID, r.maxRejects+1, c.Listener)
				c.File.Close()
				continue
			}
		}
		keep = append(keep, c)
	}
	r.held = append(keep, r.held...)
	r.mu.Unlock()
	r.flushLater()
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
// or no worker has room.
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
			err := b.w.ch.Send(b.conns...)
			r.mu.Lock()
			b.w.sending -= len(b.conns)
			r.mu.Unlock()
			switch {
			case err == nil:
			case errors.Is(err, rr.ErrNotSent):
				// Retired meanwhile; the connections are still ours.
				r.requeue(b.conns, false)
			default:
				// The worker died or broke the channel: the Channel has
				// the connections; retiring it hands them back.
				r.retire(b.w)
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
		if !w.ready || w.gone {
			continue
		}
		unacked := r.loadLocked(w)
		if unacked >= r.maxPending {
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

// receive reads w's channel until it ends, then retires w.
func (r *roundRobin) receive(w *rrWorker) {
	for {
		ev, err := w.ch.Recv()
		if err != nil {
			r.mu.Lock()
			closing := r.closed || w.gone
			r.mu.Unlock()
			if !closing && !errors.Is(err, net.ErrClosed) {
				r.out.warnf("worker %d (pid %d): round-robin channel: %v", w.index, w.pid, err)
			}
			r.retire(w)
			return
		}
		switch ev.Type {
		case rr.TypeReject:
			r.mu.Lock()
			r.wakeLocked()
			r.mu.Unlock()
			r.requeue(ev.Rejected, true)
		case rr.TypeAck:
			r.mu.Lock()
			if len(r.rejects) > 0 {
				for _, id := range ev.IDs {
					delete(r.rejects, id)
				}
			}
			r.wakeLocked()
			held := len(r.held) > 0
			r.mu.Unlock()
			if held {
				r.flushLater()
			}
		}
	}
}

// retire stops using w's channel and hands every connection it had not
// acknowledged to other workers. It may be called more than once.
func (r *roundRobin) retire(w *rrWorker) {
	r.mu.Lock()
	if !w.gone {
		w.gone = true
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
	r.mu.Unlock()
	left, _ := w.ch.Close()
	r.requeue(left, false)
}

func closeConns(conns []rr.Conn) {
	for _, c := range conns {
		c.File.Close()
	}
}
