package rr

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Conn is one accepted connection on the dispatcher side.
type Conn struct {
	// ID names the connection in ACK, CLOSED and REJECT messages. The
	// dispatcher chooses it; it must be unique among the connections a
	// Channel holds and should stay the same when a connection is handed to
	// another worker.
	ID uint64
	// Listener is the index of the listener that accepted it, in the
	// order of the worker's COHORT_RR_LISTENERS.
	Listener uint16
	// fd is the dispatcher's copy of the connection plus one, so that the
	// zero Conn holds none. A bare descriptor, not an *os.File: the
	// dispatcher never reads or writes it, and os.NewFile costs an fcntl,
	// three allocations and a finalizer per connection, and every use a
	// reference count (1.9 µs of the dispatcher's ~30 per connection on
	// the 2-CPU test VM, issue 19). The price is the care an fd needs: a
	// Conn is closed exactly once, by whoever holds it last.
	fd int
}

// NewConn makes the Conn of fd, a connected stream socket accepted on
// listener, which the Conn then owns: close it with Close. fd should be
// close-on-exec and in blocking mode (accept4 with SOCK_CLOEXEC makes it
// so); the worker sets the mode it wants.
func NewConn(fd int, listener uint16) Conn {
	return Conn{Listener: listener, fd: fd + 1}
}

// FileConn makes a Conn of the connection f holds, for a caller that has
// it as an *os.File: the Conn gets a close-on-exec duplicate of its
// descriptor (sharing the open file description, so its mode too), and f
// is closed either way.
func FileConn(f *os.File, listener uint16) (Conn, error) {
	defer f.Close()
	fd, err := rawFD(f)
	if err != nil {
		return Conn{}, fmt.Errorf("connection %s: %w", f.Name(), err)
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return Conn{}, fmt.Errorf("duplicate connection %s: %w", f.Name(), err)
	}
	return NewConn(dup, listener), nil
}

// FD is the connection's descriptor (-1 for the zero Conn); it stays the
// Conn's.
func (c Conn) FD() int { return c.fd - 1 }

// Close closes the dispatcher's copy of the connection without waiting
// for its client. Only one copy of a Conn may be closed, once.
//
// The copy shares its socket with the worker's, and a worker may have set
// SO_LINGER (some servers do, to have close wait for delivery). Once the
// worker has closed its own copy, the dispatcher's close is the last and,
// with a linger time, waits until the client acknowledges everything or
// the time runs out, with the dispatcher's event loop stopped. Turning the
// linger time off first makes the close return at once while the kernel
// still delivers what is queued, as for any close; the worker's own close,
// if it comes later, returns at once too, which is all it loses. An abort
// (SO_LINGER on with 0 s) never waits and is left as the worker set it.
//
// A worker that sets a linger time again between the check and the close
// can still make the close wait: no option closes that window. The
// dispatcher's balancer ends such a close with a signal
// (dispatcher/internal/balance, closeguard.go).
func (c Conn) Close() error {
	fd := c.FD()
	if fd < 0 {
		return fmt.Errorf("close connection %d: %w", c.ID, ErrInvalidConn)
	}
	if l, err := unix.GetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER); err == nil && l.Onoff != 0 && l.Linger > 0 {
		unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{})
	}
	// EINTR: Linux has released the descriptor already (close(2)); a
	// retry could close one opened meanwhile.
	if err := unix.Close(fd); err != nil && err != unix.EINTR {
		return fmt.Errorf("close connection %d: %w", c.ID, err)
	}
	return nil
}

// Event is one message from a worker, already applied to the Channel's
// bookkeeping.
type Event struct {
	// Type is TypeAck, TypeClosed, TypeReject or TypeHello.
	Type Type
	// IDs are the ids the message carried.
	IDs []uint64
	// Rejected holds, for TypeReject, the connections the Channel still
	// held for those ids. The caller owns them: hand them to another
	// worker or close them.
	Rejected []Conn
	// Ignored is how many of IDs the Channel did not apply: an ACK or
	// REJECT of an id it was not waiting for, a CLOSED of an id that was
	// not acknowledged and open. A worker cannot move the Channel's counts
	// with ids it was never sent.
	Ignored int
}

// ErrInvalidConn is wrapped by Send's error when a Conn cannot be sent; the
// caller then still owns every Conn it passed.
var ErrInvalidConn = errors.New("invalid connection")

// ErrWouldBlock is wrapped by TrySend's error when the worker's receive
// queue is full (the worker is not reading its channel fast enough), and
// by TryRecv's when no message is queued.
var ErrWouldBlock = errors.New("channel full")

// errRecvWouldBlock is TryRecv's error when nothing is queued, made once:
// an event loop that polls channels gets it for most of its calls.
var errRecvWouldBlock = fmt.Errorf("recv: %w", ErrWouldBlock)

// ErrNotSent is wrapped by Send's error when it sent nothing and took
// nothing: the caller still owns every Conn it passed. It distinguishes a
// Channel that was already closed (also net.ErrClosed) from a sendmsg that
// failed because the channel broke or was closed meanwhile (also
// net.ErrClosed, but the Channel then owns the Conns).
var ErrNotSent = errors.New("nothing sent")

// Channel is the dispatcher's end of one worker's round-robin channel. It
// keeps the dispatcher's copy of every connection it sent until the worker
// acknowledges it. Every method may be called from any goroutine, except
// that Recv must not be called concurrently with itself. SetReadDeadline
// bounds Recv.
type Channel struct {
	s *sock

	sendMu sync.Mutex // held for a whole Send, so Close never hands back a Conn that sendmsg is using
	buf    []byte     // under sendMu

	in *inbox // what Recv and TryRecv read and have not returned

	mu        sync.Mutex
	closed    bool
	shut      bool // Shutdown was called: nothing more is sent
	unacked   map[uint64]inflight
	order     []sent // in send order; may hold stale entries, dropped lazily
	seq       uint64 // numbers sends, to tell a stale order entry from a re-send
	open      map[uint64]struct{}
	untracked int // acknowledged beyond maxOpenTracked and not reported closed
	ignored   uint64
	spoke     bool

	// closeConn closes the copies of acknowledged connections: Conn.Close,
	// unless a test puts a close that waits in its place.
	closeConn func(Conn) error
	acked     []Conn // apply's scratch: only the one reader (Recv, TryRecv) applies
}

// inflight is a connection sent and not yet acknowledged or rejected.
type inflight struct {
	Conn
	seq uint64
	at  time.Time
}

// sent is an entry of Channel.order.
type sent struct {
	id, seq uint64
}

// maxOpenTracked bounds the memory Open's bookkeeping takes for a worker
// that acknowledges connections and never reports them closed (a worker
// need not send CLOSED): past it, acknowledged ids are only counted.
const maxOpenTracked = 1 << 16

// NewPair makes a round-robin channel: a connected SOCK_SEQPACKET socket
// pair, both ends close-on-exec. The Channel owns its end. The caller owns
// worker, the worker's end (named FDName): it passes it to the worker as a
// LISTEN_FDS entry named FDName (for example through exec.Cmd.ExtraFiles)
// and closes its own copy once the worker has started.
func NewPair() (ch *Channel, worker *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	s, err := newSock(fds[0], "cohort-rr-dispatcher")
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return &Channel{
		s:         s,
		in:        newInbox(),
		unacked:   make(map[uint64]inflight),
		open:      make(map[uint64]struct{}),
		closeConn: Conn.Close,
	}, os.NewFile(uintptr(fds[1]), FDName), nil
}

// Send hands conns to the worker, in messages of at most MaxFDs
// connections. It blocks while the worker's receive buffer is full.
//
// If a Conn holds no descriptor, or has a duplicate ID or an ID the
// Channel already holds, Send returns an error wrapping ErrInvalidConn and
// sends nothing; after Close it returns an error wrapping net.ErrClosed.
// Both errors also wrap ErrNotSent: the caller keeps ownership of every
// Conn. Otherwise the Channel owns all the Conns, whether or not sending
// succeeds: it closes each when the worker
// acknowledges it, returns it in an Event when the worker rejects it, and
// returns the rest from Close (so after a failed Send, typically because
// the worker died, call Close and re-send what it returns).
func (ch *Channel) Send(conns ...Conn) error {
	ch.sendMu.Lock()
	defer ch.sendMu.Unlock()
	if err := ch.register(conns); err != nil {
		return err
	}
	fds := make([]int, 0, MaxFDs)
	es := make([]entry, 0, MaxFDs)
	for batch := range slices.Chunk(conns, MaxFDs) {
		fds, es = fds[:0], es[:0]
		for _, c := range batch {
			fds = append(fds, c.FD())
			es = append(es, entry{id: c.ID, listener: c.Listener})
		}
		ch.buf = appendConns(ch.buf[:0], es)
		if err := ch.s.send(ch.buf, fds); err != nil {
			return fmt.Errorf("send %d conns: %w", len(batch), err)
		}
	}
	return nil
}

// TrySend is Send without waiting: it sends as many whole messages as the
// worker's receive queue has room for and returns how many of conns went
// out (a prefix). The Channel owns those; the caller keeps
// conns[n:] and may send them elsewhere. When the queue is
// full the error wraps ErrWouldBlock; after Close or Shutdown, or for an
// invalid Conn, it wraps ErrNotSent (n is 0); any other error (the worker
// closed its end: EPIPE; too many fds in flight: ETOOMANYREFS) wraps the
// errno.
func (ch *Channel) TrySend(conns ...Conn) (int, error) {
	ch.sendMu.Lock()
	defer ch.sendMu.Unlock()
	if err := ch.register(conns); err != nil {
		return 0, err
	}
	fds := make([]int, 0, MaxFDs)
	es := make([]entry, 0, MaxFDs)
	n := 0
	for batch := range slices.Chunk(conns, MaxFDs) {
		fds, es = fds[:0], es[:0]
		for _, c := range batch {
			fds = append(fds, c.FD())
			es = append(es, entry{id: c.ID, listener: c.Listener})
		}
		ch.buf = appendConns(ch.buf[:0], es)
		if err := ch.s.trySend(ch.buf, fds); err != nil {
			ch.unregister(conns[n:])
			if errors.Is(err, unix.EAGAIN) {
				err = fmt.Errorf("send %d conns: %w: %w", len(batch), ErrWouldBlock, err)
			} else {
				err = fmt.Errorf("send %d conns: %w", len(batch), err)
			}
			return n, err
		}
		n += len(batch)
	}
	return n, nil
}

// unregister forgets conns that register recorded but that were not sent.
func (ch *Channel) unregister(conns []Conn) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	for _, c := range conns {
		delete(ch.unacked, c.ID)
	}
}

// WaitWritable waits until the worker's receive queue has room again
// after TrySend found it full, or until the channel is shut down or
// closed (then it returns an error, or nil when a shutdown made the
// socket report an error or hang-up: TrySend then fails at once).
func (ch *Channel) WaitWritable() error {
	if err := ch.s.wait(unix.POLLOUT, false); err != nil {
		return fmt.Errorf("wait for room on round-robin channel: %w", err)
	}
	return nil
}

// Shutdown ends the channel in both directions but keeps what the worker
// already sent readable: the worker's next send fails (EPIPE), it reads
// what it was sent and then end of stream, and Recv returns every message
// the worker sent before Shutdown, then an error wrapping net.ErrClosed.
// So a caller that takes connections back from a worker that is still
// running learns every ACK it sent in time, and the worker learns that
// the rest is no longer its to serve. Send and TrySend fail afterwards
// (ErrNotSent). Shutdown does not release anything: call Close after
// Recv has ended.
func (ch *Channel) Shutdown() error {
	ch.mu.Lock()
	ch.shut = true
	ch.mu.Unlock()
	if err := ch.s.shutdown(); err != nil && !errors.Is(err, unix.ENOTCONN) {
		return fmt.Errorf("shut down round-robin channel: %w", err)
	}
	return nil
}

// register checks conns and records them as unacknowledged.
func (ch *Channel) register(conns []Conn) error {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if ch.closed || ch.shut {
		return fmt.Errorf("send: %w: %w", ErrNotSent, net.ErrClosed)
	}
	seen := make(map[uint64]bool, len(conns))
	for _, c := range conns {
		_, held := ch.unacked[c.ID]
		switch {
		case c.fd <= 0:
			return fmt.Errorf("send conn %d: %w: %w: no descriptor", c.ID, ErrNotSent, ErrInvalidConn)
		case held || seen[c.ID]:
			return fmt.Errorf("send conn %d: %w: %w: id already in flight", c.ID, ErrNotSent, ErrInvalidConn)
		}
		seen[c.ID] = true
	}
	now := time.Now()
	for _, c := range conns {
		ch.seq++
		ch.unacked[c.ID] = inflight{Conn: c, seq: ch.seq, at: now}
		ch.order = append(ch.order, sent{id: c.ID, seq: ch.seq})
	}
	return nil
}

// Recv waits for the next message from the worker and applies it: for an
// ACK it closes the dispatcher's copies, for a REJECT it hands them back in
// the Event. Ids the Channel does not hold are not applied (Event.Ignored
// counts them). When the worker has closed its end (it exited, or closed
// all its round-robin listeners), or after Shutdown once the worker's
// last messages are read, Recv returns an error wrapping net.ErrClosed;
// after a malformed message it returns an error wrapping ErrProtocol, and
// any fds the worker attached are closed. After any other error than a
// timeout (see SetReadDeadline) the caller should Close the Channel and
// re-send what Close returns.
func (ch *Channel) Recv() (Event, error) {
	if ch.in.buffered() == 0 {
		if err := ch.s.recvBatch(ch.in); err != nil {
			return ch.apply(nil, nil, err)
		}
	}
	return ch.applyNext()
}

// TryRecv is Recv without waiting: when no message is queued it returns
// an error wrapping ErrWouldBlock at once. It is for a caller that waits
// for the channel's readiness itself (an epoll set holding many
// channels), so that one thread serves every worker's acknowledgements
// without a goroutine, and a wake-up, per channel. Like Recv, it must not
// be called concurrently with itself or with Recv.
//
// Messages are read several at a time (recvmmsg(2)); after a read that
// found fewer than it could take, the call that finds none read reports
// ErrWouldBlock without asking the kernel again (a message that came
// meanwhile makes the channel readable: the next call reads it).
func (ch *Channel) TryRecv() (Event, error) {
	if ch.in.buffered() == 0 {
		if ch.in.short {
			ch.in.short = false
			return Event{}, errRecvWouldBlock
		}
		if err := ch.s.tryRecvBatch(ch.in); err == unix.EAGAIN {
			return Event{}, errRecvWouldBlock
		} else if err != nil {
			return ch.apply(nil, nil, err)
		}
	}
	return ch.applyNext()
}

// Buffered is how many messages Recv and TryRecv have read from the
// socket and not yet returned: a caller that bounds its TryRecv calls
// per readiness event must not stop while some are, since the socket
// itself no longer reports them.
func (ch *Channel) Buffered() int { return ch.in.buffered() }

// applyNext applies the next message read; after an error it drops the
// rest, closing any fds they carry.
func (ch *Channel) applyNext() (Event, error) {
	b, fds, err := ch.in.pop()
	ev, err := ch.apply(b, fds, err)
	if err != nil {
		ch.in.drop()
	}
	return ev, err
}

// FD calls f with the channel's descriptor, for adding it to an epoll
// set; f must not keep it past Close.
func (ch *Channel) FD(f func(fd int)) error {
	return ch.s.control(f)
}

// apply turns one received message into an Event and applies it.
func (ch *Channel) apply(b []byte, fds []int, err error) (Event, error) {
	if errors.Is(err, errEOF) {
		return Event{}, fmt.Errorf("recv: %w: %w", errEOF, net.ErrClosed)
	}
	if err != nil {
		return Event{}, fmt.Errorf("recv: %w", err)
	}
	if len(fds) > 0 {
		closeFDs(fds)
		return Event{}, fmt.Errorf("recv: %w: worker sent %d fds", ErrProtocol, len(fds))
	}
	m, err := parse(b)
	if err != nil {
		return Event{}, fmt.Errorf("recv: %w", err)
	}
	if m.typ == TypeConns {
		return Event{}, fmt.Errorf("recv: %w: worker sent %v", ErrProtocol, m.typ)
	}
	ev := Event{Type: m.typ, IDs: m.ids}
	// The copies of acknowledged connections are closed after the lock
	// is released: a close can wait (a worker that set SO_LINGER again
	// after Conn.Close turned it off; the dispatcher's close guard ends
	// that wait), and every other method, Oldest for the guard's own
	// watcher among them, must not wait with it.
	acked := ch.acked[:0]
	defer func() {
		for i, c := range acked {
			ch.closeConn(c)
			acked[i] = Conn{}
		}
		ch.acked = acked[:0]
	}()
	ch.mu.Lock()
	defer ch.mu.Unlock()
	ch.spoke = true
	switch m.typ {
	case TypeAck:
		for _, id := range m.ids {
			c, ok := ch.unacked[id]
			if !ok {
				ev.Ignored++
				continue
			}
			delete(ch.unacked, id)
			acked = append(acked, c.Conn)
			if len(ch.open) < maxOpenTracked {
				ch.open[id] = struct{}{}
			} else {
				ch.untracked++
			}
		}
	case TypeClosed:
		for _, id := range m.ids {
			if _, ok := ch.open[id]; ok {
				delete(ch.open, id)
			} else if ch.untracked > 0 {
				// Past the tracking bound ids are not known: trust
				// the count, never below what is tracked.
				ch.untracked--
			} else {
				ev.Ignored++
			}
		}
	case TypeReject:
		for _, id := range m.ids {
			c, ok := ch.unacked[id]
			if !ok {
				ev.Ignored++
				continue
			}
			delete(ch.unacked, id)
			ev.Rejected = append(ev.Rejected, c.Conn)
		}
	}
	ch.ignored += uint64(ev.Ignored)
	ch.compact()
	return ev, nil
}

// compact drops stale entries from ch.order once they dominate it.
func (ch *Channel) compact() {
	if len(ch.order) < 64 || len(ch.order) < 2*len(ch.unacked) {
		return
	}
	ch.order = slices.DeleteFunc(ch.order, ch.stale)
}

// stale reports whether an order entry no longer names a connection in
// flight (it was acknowledged or rejected, or re-sent later).
func (ch *Channel) stale(e sent) bool {
	c, ok := ch.unacked[e.id]
	return !ok || c.seq != e.seq
}

// Oldest returns when the connection that has waited longest for the
// worker's ACK was sent, or the zero time when none waits: the measure
// of a worker that has stopped taking connections.
func (ch *Channel) Oldest() time.Time {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	i := 0
	for i < len(ch.order) && ch.stale(ch.order[i]) {
		i++
	}
	ch.order = ch.order[i:]
	if len(ch.order) == 0 {
		return time.Time{}
	}
	return ch.unacked[ch.order[0].id].at
}

// Spoke reports whether the worker has sent at least one well-formed
// message (HELLO, ACK, CLOSED or REJECT).
func (ch *Channel) Spoke() bool {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.spoke
}

// Ignored reports how many ids the worker sent that the Channel did not
// apply (see Event.Ignored).
func (ch *Channel) Ignored() uint64 {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.ignored
}

// SetReadDeadline makes a blocked or later Recv return an error wrapping
// os.ErrDeadlineExceeded at t; the zero time means no deadline. A Recv
// that times out has read nothing: the Channel stays usable, and Recv
// can be called again (after moving the deadline).
func (ch *Channel) SetReadDeadline(t time.Time) error {
	return ch.s.setReadDeadline(t)
}

// Unacked reports how many connections were sent (or are being sent) and
// neither acknowledged nor rejected yet: the dispatcher's measure of how
// far behind the worker is.
func (ch *Channel) Unacked() int {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return len(ch.unacked)
}

// Open reports how many acknowledged connections the worker has not yet
// reported closed. It is meaningful only for workers that send CLOSED (the
// Go library and examples/python/rr_worker.py do). Only a CLOSED of an id
// that was acknowledged on this Channel and is still open counts.
func (ch *Channel) Open() int {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return len(ch.open) + ch.untracked
}

// Close closes the dispatcher's end of the channel, which makes blocked
// Send and Recv calls return, and returns every connection not yet
// acknowledged or rejected, in the order they were sent. The caller owns
// them: hand them to another worker or close them. Later calls
// return nothing.
func (ch *Channel) Close() ([]Conn, error) {
	err := ch.s.close()
	ch.sendMu.Lock() // wait for a running Send to let go of the Conns
	defer ch.sendMu.Unlock()
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if ch.closed {
		return nil, nil
	}
	ch.closed = true
	var left []Conn
	for _, e := range ch.order {
		if !ch.stale(e) {
			left = append(left, ch.unacked[e.id].Conn)
			delete(ch.unacked, e.id)
		}
	}
	ch.order = nil
	if err != nil {
		err = fmt.Errorf("close round-robin channel: %w", err)
	}
	return left, err
}
