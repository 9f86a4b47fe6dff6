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
// A loop waits in a blocking epoll_wait made with RawSyscall, so it keeps
// its thread and its P while it waits (New adds a P per loop to
// GOMAXPROCS, Close takes them back), and a wake-up is the kernel's alone:
// no netpoller, no goroutine to wake, no sysmon. Measured with one byte
// every 250 µs from another process (BenchmarkWakeFloor), a wake-up cost
// 16–19 µs of CPU this way against 40–49 µs for a goroutine parked in
// Go's netpoller and 62–65 µs for a blocking Syscall (which sysmon
// retakes the P from on every wait). The runtime still preempts the
// loop every 10 ms and for each stop-the-world (a signal: epoll_wait
// returns EINTR, and the loop yields: see wait). Stop wakes it with an
// eventfd in its set.

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// loop is one event loop.
type loop struct {
	// ep is the epoll set, in blocking mode: os.NewFile keeps it out of
	// Go's netpoller, and its Close waits for no one (a wait holds a
	// reference, so the fd is released when that wait returns).
	ep *os.File
	rc syscall.RawConn
	// wake is an eventfd in the set (token wakeToken): stop makes it
	// readable, which ends the wait. Only run closes it, after its last
	// wait: a closed fd would leave the set before the wait saw it.
	wake *os.File

	// draining is the worker whose channel run reads and applies (drain),
	// nil between; drains counts those calls. By them the close guard
	// tells whose connection a close that waits in this loop closes: a
	// drain that has not ended between two of its looks is waiting.
	draining atomic.Pointer[worker]
	drains   atomic.Uint64
}

// wakeToken names the loop's eventfd in its events: listeners have
// 0…len-1, channels the tokens after, waiting PROXY connections -2 and
// below.
const wakeToken = -1

// maxEvents bounds what one epoll_wait returns; what is left stays ready
// (level-triggered) for the next.
const maxEvents = 64

// maxRecvPerEvent bounds the messages read from one channel per wake-up,
// so that one chatty worker cannot keep a loop from the others.
const maxRecvPerEvent = 64

// acceptPause is how long listeners rest after accept failed with
// EMFILE, ENFILE, ENOBUFS…: the connections wait in the backlog.
const acceptPause = 50 * time.Millisecond

// newLoop makes an epoll set holding its wake eventfd.
func newLoop() (*loop, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	ep := os.NewFile(uintptr(fd), "cohort-rr-epoll")
	rc, err := ep.SyscallConn()
	if err != nil {
		ep.Close()
		return nil, fmt.Errorf("epoll set: %w", err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		ep.Close()
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	l := &loop{ep: ep, rc: rc, wake: os.NewFile(uintptr(efd), "cohort-rr-wake")}
	if err := l.ctl(unix.EPOLL_CTL_ADD, efd, wakeToken, unix.EPOLLIN); err != nil {
		l.close()
		return nil, fmt.Errorf("epoll_ctl: %w", err)
	}
	return l, nil
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

// stop ends the loop: its wait (or its next) returns, and the closed set
// fails the one after. It may be called more than once.
func (l *loop) stop() {
	// Any non-zero counter makes the eventfd readable, whatever the
	// byte order. The write fails only once run has closed it (the loop
	// has ended), the Close only when it is closed already.
	l.wake.Write([]byte{1, 0, 0, 0, 0, 0, 0, 0})
	l.ep.Close()
}

// close releases the loop's fds; only run (or newLoop) calls it.
func (l *loop) close() {
	l.ep.Close()
	l.wake.Close()
}

// wait blocks until something in the set is ready, timeoutMs passes
// (-1: no timeout) or stop; it reports false once the loop has been
// stopped.
func (l *loop) wait(events []unix.EpollEvent, timeoutMs int) (int, bool, error) {
	for {
		var n int
		var werr error
		if err := l.rc.Control(func(ep uintptr) { n, werr = epollWait(int(ep), events, timeoutMs) }); err != nil {
			return 0, false, nil
		}
		if werr != unix.EINTR {
			return n, true, werr
		}
		// A signal, most often the runtime's: a stop-the-world, or
		// sysmon preempting a goroutine that has run for 10 ms. The
		// raw call's path has no preemption point, and waiting again
		// at once would keep the whole process stopped (and the
		// runtime signalling) until a connection came: yield first.
		runtime.Gosched()
	}
}

// sleep waits for d or until stop, whichever comes first, in ppoll(2) on
// the wake eventfd alone: the set cannot serve, its listeners being
// ready. Like wait it keeps the thread and the P; the runtime's signals
// (sysmon preempts a call made with RawSyscall after 10 ms, as it would
// a goroutine running that long) get a yield (see wait), then the rest
// of the sleep. Only run calls it (wake is open).
func (l *loop) sleep(d time.Duration) {
	until := time.Now().Add(d)
	pfd := unix.PollFd{Fd: int32(l.wake.Fd()), Events: unix.POLLIN} // blocking already: Fd changes nothing
	for d > 0 {
		ts := unix.NsecToTimespec(int64(d))
		_, _, errno := unix.RawSyscall6(unix.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1, uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
		if errno != unix.EINTR {
			return // the time is up, or stop
		}
		runtime.Gosched()
		d = time.Until(until)
	}
}

// ackReadDelay bounds how long a loop leaves its channels' messages
// unread while it reads them lazily (see run).
const ackReadDelay = time.Millisecond

// run is a loop's goroutine: it waits for the set, then handles every
// ready fd, until stop (Close, or New's ctx ended).
//
// Reading acknowledgements lazily halves the wake-ups of a paced stream
// of connections: one for the connection, none for its ACK. While the
// listeners are in the set and a channel of the loop has connections
// unacknowledged, the loop's channels leave the set for reading (they
// stay in it for hang-ups), the loop reads every channel that may have
// something to say on each wake-up, before accepting (room depends on
// the ACKs), and it waits at most ackReadDelay. The dispatcher's copy of
// a connection keeps the connection open until the ACK is read, so a
// client that waits for the server's FIN sees it up to ackReadDelay late;
// when no connection comes meanwhile the delay ends the wait. A wait that
// ended with nothing new puts the channels back for reading, so an idle
// loop sleeps until something happens; so does a loop whose listeners
// left the set (no worker has room: an ACK must wake it at once).
//
// With an accept interval (Config.AcceptInterval) a loop that accepts
// again less than the interval after its last accept round ended (a
// stream of connections, not one now and then) sleeps for the interval
// before it waits again: what came meanwhile is accepted in one round,
// handed on in one message per worker, and its ACKs come in fewer
// messages. A wake-up costs this VM's dispatcher 17–19 µs, about a third
// of a connection's cost at 4,000/s; the price is up to the interval of
// delay for a connection that arrives during the sleep. A loop whose
// connections stop returns to waiting at the end of the sleep. A round
// that stopped at one message's worth of connections with more waiting
// is followed by another at once: the interval paces a stream, it does
// not cap its rate.
func (b *Balancer) run(li int, l *loop) {
	defer l.close()
	events := make([]unix.EpollEvent, maxEvents)
	batch := make([]rr.Conn, 0, rr.MaxFDs)
	var mine []*worker // scratch: this loop's channels that may have something to say
	lazy := false      // this loop's channels are read on each wake-up, not watched for reading
	var lastAll time.Time
	var lastRound time.Time // the end of the last round that accepted (accept interval)
	for {
		timeout := -1
		if lazy {
			timeout = int(ackReadDelay / time.Millisecond)
		}
		n, ok, werr := l.wait(events, timeout)
		if !ok {
			return // stopped
		}
		if werr != nil {
			b.warnf("round-robin: epoll_wait: %v; not balancing any more", werr)
			return
		}
		held := false
		heard := false
		accepted := false // this round accepted connections
		backlog := false  // and may have left some waiting
		if lazy {
			// Channels with ACKs due are read on every wake-up, the rest
			// (CLOSED, HELLO) once per ackReadDelay.
			all := false
			if now := time.Now(); now.Sub(lastAll) >= ackReadDelay {
				all, lastAll = true, now
			}
			mine = b.speakers(li, mine[:0], all)
			for _, w := range mine {
				got, flush := b.drainOn(l, w)
				heard = heard || got
				held = held || flush
			}
		}
		for _, ev := range events[:n] {
			if ev.Fd == wakeToken {
				continue // stop: the next wait fails
			}
			if ev.Fd < 0 {
				b.headerReady(ev.Fd)
				continue
			}
			if int(ev.Fd) < len(b.lfds) {
				var more bool
				batch, more = b.acceptOn(li, int(ev.Fd), batch[:0])
				accepted = accepted || len(batch) > 0
				backlog = backlog || more
				continue
			}
			b.mu.Lock()
			w := b.byToken[ev.Fd]
			b.mu.Unlock()
			if w != nil {
				if _, flush := b.drainOn(l, w); flush {
					held = true
				}
			}
		}
		if held {
			b.flush()
		}
		lazy = b.pace(li, n > 0 || heard)
		if accepted && !backlog && b.acceptEvery > 0 {
			now := time.Now()
			if now.Sub(lastRound) < b.acceptEvery {
				l.sleep(b.acceptEvery)
				now = time.Now()
			}
			lastRound = now
		}
	}
}

// speakers appends the live channels of loop li that may have a message
// queued: connections unacknowledged, and with all also connections open
// or no word yet.
func (b *Balancer) speakers(li int, out []*worker, all bool) []*worker {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, w := range b.workers {
		if w.loop == li && !w.gone && (b.loadLocked(w) > 0 || all && (w.ch.Open() > 0 || !w.spoke)) {
			out = append(out, w)
		}
	}
	return out
}

// pace decides whether loop li reads its channels lazily until its next
// wake-up, and sets their registrations to match (a channel starts out
// watched for reading; they stay in the set for hang-ups and errors
// either way). Lazily only while busy (this wake-up brought an event or
// a message), the listeners are in the set (a connection will wake the
// loop) and one of its channels has connections unacknowledged (an ACK
// is due).
func (b *Balancer) pace(li int, busy bool) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	lazy := false
	if busy && b.armed {
		for _, w := range b.workers {
			if w.loop == li && !w.gone && b.loadLocked(w) > 0 {
				lazy = true
				break
			}
		}
	}
	events := uint32(unix.EPOLLIN | unix.EPOLLRDHUP)
	if lazy {
		events = unix.EPOLLRDHUP
	}
	for _, w := range b.workers {
		if w.loop == li && !w.gone && w.lazy != lazy {
			w.lazy = lazy
			// ENOENT: retired meanwhile; nothing else can fail.
			w.ch.FD(func(fd int) { b.loops[li].ctl(unix.EPOLL_CTL_MOD, fd, w.token, events) })
		}
	}
	return lazy
}

// acceptOn accepts on listener index as many connections as ready
// workers have room for (at most one message's worth), numbers them and
// sends them on. more reports that it stopped at that bound, not because
// the listener had nothing left.
func (b *Balancer) acceptOn(l, index int, batch []rr.Conn) (_ []rr.Conn, more bool) {
	b.mu.Lock()
	room := min(b.roomLocked(), rr.MaxFDs)
	if room == 0 {
		b.disarmLocked() // ACKs and new workers re-arm (wakeLocked)
	}
	b.mu.Unlock()
	fd := b.lfds[index]
	var aerr unix.Errno
	var keys [rr.MaxFDs]uint64
	more = true
	for len(batch) < room {
		var nfd uintptr
		var errno unix.Errno
		if b.sticky && !b.proxy {
			nfd, keys[len(batch)], errno = acceptKey(fd)
		} else {
			nfd, errno = accept4(fd)
		}
		if errno == 0 {
			batch = append(batch, rr.NewConn(int(nfd), uint16(index)))
			continue
		}
		if errno == unix.EINTR || errno == unix.ECONNABORTED || errno == unix.EPROTO {
			continue
		}
		if errno != unix.EAGAIN {
			aerr = errno
		}
		more = false
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
	return batch, more
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
// blocking mode, the mode a worker expects to start from: it sets the
// one it wants, as net.FileConn and Python's socket timeouts do.
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

// epollWait is a blocking epoll_wait(2) made with RawSyscall (see the top
// of this file); accept4 and acceptKey use RawSyscall too, as the
// channel's sends and receives do (activation/rr/scm.go says why): they
// never block, and a Syscall would wake the runtime's sysmon thread.
func epollWait(ep int, events []unix.EpollEvent, timeoutMs int) (int, error) {
	// epoll_pwait with no signal mask is epoll_wait, which arm64 lacks.
	n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(ep), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), uintptr(timeoutMs), 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}
