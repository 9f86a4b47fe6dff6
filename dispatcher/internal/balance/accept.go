package balance

// The event loops: each waits on one epoll set holding the listeners
// (while ready workers have room) and the channels of some workers, and
// does what is ready itself: accepts and sends, reads acknowledgements.
// One wake-up serves everything that became ready together, and no
// goroutine hands work to another on the way of a connection: a profile
// of the goroutine-per-fd design it replaces (an acceptor per listener, a
// receiver per channel) spent most of the dispatcher's CPU on thread
// wake-ups between them (issue 19).
//
// The epoll fd itself sits in Go's netpoller (a non-blocking epoll fd is
// pollable), so a loop is an ordinary goroutine that parks while nothing
// is ready, and Close wakes it by closing the fd. Waiting in a blocking
// epoll_wait instead (a goroutine in a system call) measured worse: the
// runtime preempts a goroutine that never parks every 10 ms and
// reschedules it (2.4 context switches per connection against 1.3).

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"syscall"
	"time"
	"unsafe"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// loop is one event loop.
type loop struct {
	ep *os.File // the epoll set, non-blocking, in Go's netpoller
	rc syscall.RawConn
}

// maxEvents bounds what one epoll_wait returns; what is left stays ready
// (level-triggered) for the next.
const maxEvents = 64

// maxRecvPerEvent bounds the messages read from one channel per wake-up,
// so that one chatty worker cannot keep a loop from the others.
const maxRecvPerEvent = 64

// acceptPause is how long listeners rest after accept failed with
// EMFILE, ENFILE, ENOBUFS…: the connections wait in the backlog.
const acceptPause = 50 * time.Millisecond

// newLoop makes an empty epoll set in Go's netpoller.
func newLoop() (*loop, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("epoll set non-blocking: %w", err)
	}
	ep := os.NewFile(uintptr(fd), "cohort-rr-epoll")
	// An fd the netpoller refused has no deadlines: RawConn.Read would
	// then fail instead of waiting.
	if err := ep.SetReadDeadline(time.Time{}); err != nil {
		ep.Close()
		return nil, fmt.Errorf("epoll set not pollable: %w", err)
	}
	rc, err := ep.SyscallConn()
	if err != nil {
		ep.Close()
		return nil, fmt.Errorf("epoll set: %w", err)
	}
	return &loop{ep: ep, rc: rc}, nil
}

// ctl adds (op EPOLL_CTL_ADD) or removes (EPOLL_CTL_DEL) fd, named by
// token in the events it reports; after stop it fails.
func (l *loop) ctl(op, fd int, token int32, events uint32) error {
	var cerr error
	err := l.rc.Control(func(ep uintptr) {
		ev := unix.EpollEvent{Events: events, Fd: token}
		cerr = unix.EpollCtl(int(ep), op, fd, &ev)
	})
	if err == nil {
		err = cerr
	}
	return err
}

// stop closes the set, which ends its loop (parked in RawConn.Read, or
// at its next wait).
func (l *loop) stop() { l.ep.Close() }

// run is a loop's goroutine: it waits for the set, then handles every
// ready fd, until stop (Close, or New's ctx ended).
func (b *Balancer) run(li int, l *loop) {
	events := make([]unix.EpollEvent, maxEvents)
	batch := make([]rr.Conn, 0, rr.MaxFDs)
	for {
		var n int
		var werr error
		err := l.rc.Read(func(ep uintptr) bool {
			for {
				n, werr = epollWaitNow(int(ep), events)
				if werr != unix.EINTR {
					return werr != nil || n > 0
				}
			}
		})
		if err != nil {
			return // stopped
		}
		if werr != nil {
			b.warnf("round-robin: epoll_wait: %v; not balancing any more", werr)
			return
		}
		held := false
		for _, ev := range events[:n] {
			if ev.Fd < 0 {
				b.headerReady(ev.Fd)
				continue
			}
			if int(ev.Fd) < len(b.lfds) {
				batch = b.acceptOn(li, int(ev.Fd), batch[:0])
				continue
			}
			b.mu.Lock()
			w := b.byToken[ev.Fd]
			b.mu.Unlock()
			if w != nil && b.drain(w) {
				held = true
			}
		}
		if held {
			b.flush()
		}
	}
}

// acceptOn accepts on listener index as many connections as ready
// workers have room for (at most one message's worth), numbers them and
// sends them on.
func (b *Balancer) acceptOn(l, index int, batch []rr.Conn) []rr.Conn {
	b.mu.Lock()
	room := min(b.roomLocked(), rr.MaxFDs)
	if room == 0 {
		b.disarmLocked() // ACKs and new workers re-arm (wakeLocked)
	}
	b.mu.Unlock()
	fd := b.lfds[index]
	var aerr unix.Errno
	var keys [rr.MaxFDs]uint64
	for len(batch) < room {
		var nfd uintptr
		var errno unix.Errno
		if b.sticky && !b.proxy {
			nfd, keys[len(batch)], errno = acceptKey(fd)
		} else {
			nfd, errno = accept4(fd)
		}
		if errno == 0 {
			batch = append(batch, rr.Conn{Listener: uint16(index), File: os.NewFile(nfd, "conn")})
			continue
		}
		if errno == unix.EINTR || errno == unix.ECONNABORTED || errno == unix.EPROTO {
			continue
		}
		if errno != unix.EAGAIN {
			aerr = errno
		}
		break
	}
	ks := keys[:len(batch)]
	if b.proxy && len(batch) > 0 {
		batch, ks = b.proxyKeys(l, batch, ks)
	}
	if len(batch) > 0 {
		b.accepted[index].Add(uint64(len(batch)))
		b.dispatch(batch, ks)
	}
	if aerr != 0 {
		b.acceptFailed(index, aerr)
	}
	return batch
}

// acceptFailed disarms the listeners for acceptPause after accept failed
// for want of fds or memory, instead of spinning on a ready listener.
func (b *Balancer) acceptFailed(index int, err error) {
	b.mu.Lock()
	b.acceptFailures++
	n := b.acceptFailures
	b.disarmLocked()
	b.pausedAccept = true
	b.mu.Unlock()
	if n&(n-1) == 0 {
		b.warnf("accept on %s: %v (%d times so far); retrying", b.listeners[index].Name(), err, n)
	}
	time.AfterFunc(acceptPause, func() {
		b.mu.Lock()
		b.pausedAccept = false
		b.wakeLocked()
		b.mu.Unlock()
	})
}

// accept4 accepts one connection on the listening socket fd, close-on-exec
// and without asking for the peer's address. The connection is left in
// blocking mode: os.NewFile then keeps it out of the dispatcher's
// netpoller (which would watch, for nothing, every connection until the
// worker acknowledges it), and the worker sets the mode it wants, as
// net.FileConn and Python's socket timeouts do.
func accept4(fd int) (uintptr, unix.Errno) {
	nfd, _, errno := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(fd), 0, 0, unix.SOCK_CLOEXEC, 0, 0)
	return nfd, errno
}

// acceptKey is accept4 that also returns the AddrKey of the peer's IP
// address (0 for a unix socket): what a sticky policy needs, at no cost
// of a system call more.
func acceptKey(fd int) (uintptr, uint64, unix.Errno) {
	var sa unix.RawSockaddrAny
	n := uint32(unix.SizeofSockaddrAny)
	nfd, _, errno := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(fd), uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&n)), unix.SOCK_CLOEXEC, 0, 0)
	if errno != 0 {
		return 0, 0, errno
	}
	return nfd, sockaddrKey(&sa, n), 0
}

// sockaddrKey is the AddrKey of an AF_INET or AF_INET6 address (an
// IPv4-mapped IPv6 address counts as its IPv4 address), 0 otherwise.
func sockaddrKey(sa *unix.RawSockaddrAny, n uint32) uint64 {
	switch sa.Addr.Family {
	case unix.AF_INET:
		if n < unix.SizeofSockaddrInet4 {
			return 0
		}
		p := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return AddrKey(p.Addr[:])
	case unix.AF_INET6:
		if n < unix.SizeofSockaddrInet6 {
			return 0
		}
		p := (*unix.RawSockaddrInet6)(unsafe.Pointer(sa))
		return IPKey(netip.AddrFrom16(p.Addr))
	}
	return 0
}

// armLocked puts the listeners into every loop's set; with more than one
// loop, EPOLLEXCLUSIVE wakes one loop per connection, not all of them.
func (b *Balancer) armLocked() {
	if b.armed || b.closed {
		return
	}
	events := uint32(unix.EPOLLIN)
	if len(b.loops) > 1 {
		events |= unix.EPOLLEXCLUSIVE
	}
	for _, l := range b.loops {
		for i, fd := range b.lfds {
			if err := l.ctl(unix.EPOLL_CTL_ADD, fd, int32(i), events); err != nil && !errors.Is(err, unix.EEXIST) {
				b.warnf("round-robin: watching listener %s: %v", b.listeners[i].Name(), err)
			}
		}
	}
	b.armed = true
}

// disarmLocked takes the listeners out of every loop's set: nothing is
// accepted while no ready worker has room, and the kernel's backlog
// holds what comes.
func (b *Balancer) disarmLocked() {
	if !b.armed {
		return
	}
	for _, l := range b.loops {
		for _, fd := range b.lfds {
			l.ctl(unix.EPOLL_CTL_DEL, fd, 0, 0) // ENOENT: not there; nothing else can fail
		}
	}
	b.armed = false
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

// wakeLocked re-arms the listeners when room may have appeared.
func (b *Balancer) wakeLocked() {
	if !b.armed && !b.pausedAccept && b.roomLocked() > 0 {
		b.armLocked()
	}
}

// dispatch numbers freshly accepted connections and sends them on;
// keys (nil, or one per connection) are their sticky keys.
func (b *Balancer) dispatch(conns []rr.Conn, keys []uint64) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		closeConns(conns)
		return
	}
	for i := range conns {
		b.nextID++
		conns[i].ID = b.nextID
		if b.sticky && keys[i] != 0 {
			b.keys[b.nextID] = keys[i]
		}
	}
	b.held = append(b.held, conns...)
	b.mu.Unlock()
	b.flush()
}

// epollWaitNow is epoll_wait(2) with a timeout of 0. It, accept4 and
// acceptKey use RawSyscall, as the channel's sends and receives do
// (activation/rr/scm.go says why): they never block, and a Syscall would
// wake the runtime's sysmon thread on each wake-up of an idle loop.
func epollWaitNow(ep int, events []unix.EpollEvent) (int, error) {
	// epoll_pwait with no signal mask is epoll_wait, which arm64 lacks.
	n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(ep), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}
