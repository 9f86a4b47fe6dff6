package balance

// Accepting: one goroutine per listener takes connections from the
// kernel only while ready workers have room for them.

import (
	"os"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// accept is listener index's acceptor.
func (b *Balancer) accept(index int, f *os.File) {
	rc, err := f.SyscallConn()
	if err != nil {
		b.warnf("listener %s: %v; not accepting on it", f.Name(), err)
		return
	}
	batch := make([]rr.Conn, 0, rr.MaxFDs)
	var failures int
	for {
		room := b.waitRoom()
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
			b.accepted[index].Add(uint64(len(batch)))
			b.dispatch(batch)
		}
		if err != nil { // the listener was closed: Close
			return
		}
		if aerr != nil {
			// EMFILE, ENFILE, ENOBUFS…: the connections wait in the
			// backlog; retry after a pause instead of spinning.
			failures++
			if failures&(failures-1) == 0 {
				b.warnf("accept on %s: %v (%d times so far); retrying", f.Name(), aerr, failures)
			}
			select {
			case <-time.After(50 * time.Millisecond):
			case <-b.ctx.Done():
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
func (b *Balancer) waitRoom() int {
	for {
		b.mu.Lock()
		n := b.roomLocked()
		space := b.space
		if n == 0 {
			b.waiting = true
		}
		b.mu.Unlock()
		if n > 0 {
			return n
		}
		select {
		case <-space:
		case <-b.ctx.Done():
			return 0
		}
	}
}

func (b *Balancer) roomLocked() int {
	if b.closed {
		return 0
	}
	n := -len(b.held)
	for _, w := range b.workers {
		if b.usableLocked(w) {
			n += max(0, b.limitLocked(w)-b.loadLocked(w))
		}
	}
	return max(0, n)
}

// usableLocked reports whether w may be sent connections now.
func (b *Balancer) usableLocked(w *worker) bool {
	return w.ready && !w.gone && !w.revoked && !w.blocked
}

// limitLocked is how many unacknowledged connections w may have:
// max_pending, or one while it has not spoken (a program that ignores
// its channel strands one connection, for ack_timeout, not max_pending).
func (b *Balancer) limitLocked(w *worker) int {
	if !w.spoke {
		return 1
	}
	return b.maxPending
}

// loadLocked is how many connections w has not acknowledged yet, counting
// those being sent to it.
func (b *Balancer) loadLocked(w *worker) int { return w.sending + w.ch.Unacked() }

// wakeLocked tells waiting acceptors that room may have appeared.
func (b *Balancer) wakeLocked() {
	if b.waiting {
		close(b.space)
		b.space, b.waiting = make(chan struct{}), false
	}
}

// dispatch numbers freshly accepted connections and sends them on.
func (b *Balancer) dispatch(conns []rr.Conn) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		closeConns(conns)
		return
	}
	for i := range conns {
		b.nextID++
		conns[i].ID = b.nextID
	}
	b.held = append(b.held, conns...)
	b.mu.Unlock()
	b.flush()
}
