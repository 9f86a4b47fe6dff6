package rr

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"time"
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
	// File is the dispatcher's copy of the connection.
	File *os.File
}

// Event is one message from a worker, already applied to the Channel's
// bookkeeping.
type Event struct {
	// Type is TypeAck, TypeClosed or TypeReject.
	Type Type
	// IDs are the ids the message carried.
	IDs []uint64
	// Rejected holds, for TypeReject, the connections the Channel still
	// held for those ids. The caller owns their Files: hand them to another
	// worker or close them.
	Rejected []Conn
}

// ErrInvalidConn is wrapped by Send's error when a Conn cannot be sent; the
// caller then still owns every File it passed.
var ErrInvalidConn = errors.New("invalid connection")

// ErrNotSent is wrapped by Send's error when it sent nothing and took
// nothing: the caller still owns every File it passed. It distinguishes a
// Channel that was already closed (also net.ErrClosed) from a sendmsg that
// failed because the channel broke or was closed meanwhile (also
// net.ErrClosed, but the Channel then owns the Files).
var ErrNotSent = errors.New("nothing sent")

// Channel is the dispatcher's end of one worker's round-robin channel. It
// keeps the dispatcher's copy of every connection it sent until the worker
// acknowledges it. Send, Recv, Unacked, Open and Close may be called from
// different goroutines; Recv must not be called concurrently with itself.
// SetReadDeadline bounds Recv.
type Channel struct {
	c *net.UnixConn

	sendMu sync.Mutex // held for a whole Send, so Close never hands back a File that sendmsg is using
	buf    []byte     // under sendMu

	rbuf, roob []byte // Recv's buffers

	mu      sync.Mutex
	closed  bool
	unacked map[uint64]Conn
	order   []uint64 // ids in send order; may hold stale ids, compacted lazily
	open    int
}

// NewPair makes a round-robin channel: a connected SOCK_SEQPACKET socket
// pair, both ends close-on-exec. The Channel owns its end. The caller owns
// worker, the worker's end (named FDName): it passes it to the worker as a
// LISTEN_FDS entry named FDName (for example through exec.Cmd.ExtraFiles)
// and closes its own copy once the worker has started.
func NewPair() (ch *Channel, worker *os.File, err error) {
	d, w, err := socketpair()
	if err != nil {
		return nil, nil, err
	}
	c, err := unixConn(d)
	if err != nil {
		w.Close()
		return nil, nil, err
	}
	return &Channel{
		c:       c,
		rbuf:    make([]byte, MaxMessage+1),
		roob:    make([]byte, oobSize),
		unacked: make(map[uint64]Conn),
	}, w, nil
}

// Send hands conns to the worker, in messages of at most MaxFDs
// connections. It blocks while the worker's receive buffer is full.
//
// If a Conn has no File, a duplicate ID or an ID the Channel already holds,
// Send returns an error wrapping ErrInvalidConn and sends nothing; after
// Close it returns an error wrapping net.ErrClosed. Both errors also wrap
// ErrNotSent: the caller keeps ownership of every File. Otherwise the Channel owns all the Files,
// whether or not sending succeeds: it closes each when the worker
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
			fd, err := rawFD(c.File)
			if err != nil {
				return fmt.Errorf("send conn %d: %w", c.ID, err)
			}
			fds = append(fds, fd)
			es = append(es, entry{id: c.ID, listener: c.Listener})
		}
		ch.buf = appendConns(ch.buf[:0], es)
		if err := sendMsg(ch.c, ch.buf, fds); err != nil {
			return fmt.Errorf("send %d conns: %w", len(batch), err)
		}
	}
	return nil
}

// register checks conns and records them as unacknowledged.
func (ch *Channel) register(conns []Conn) error {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if ch.closed {
		return fmt.Errorf("send: %w: %w", ErrNotSent, net.ErrClosed)
	}
	seen := make(map[uint64]bool, len(conns))
	for _, c := range conns {
		_, held := ch.unacked[c.ID]
		switch {
		case c.File == nil:
			return fmt.Errorf("send conn %d: %w: %w: no file", c.ID, ErrNotSent, ErrInvalidConn)
		case held || seen[c.ID]:
			return fmt.Errorf("send conn %d: %w: %w: id already in flight", c.ID, ErrNotSent, ErrInvalidConn)
		}
		seen[c.ID] = true
	}
	for _, c := range conns {
		ch.unacked[c.ID] = c
		ch.order = append(ch.order, c.ID)
	}
	return nil
}

// Recv waits for the next message from the worker and applies it: for an
// ACK it closes the dispatcher's copies, for a REJECT it hands them back in
// the Event. Ids the Channel does not hold are ignored (but reported in
// IDs). When the worker has closed its end (it exited, or closed all its
// round-robin listeners) Recv returns an error wrapping net.ErrClosed; after
// a malformed message it returns an error wrapping ErrProtocol, and any fds
// the worker attached are closed. After any other error than a timeout
// (see SetReadDeadline) the caller should Close the Channel and re-send
// what Close returns.
func (ch *Channel) Recv() (Event, error) {
	b, fds, err := recvMsg(ch.c, ch.rbuf, ch.roob)
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
	ev := Event{Type: m.typ, IDs: m.ids}
	ch.mu.Lock()
	defer ch.mu.Unlock()
	switch m.typ {
	case TypeAck:
		for _, id := range m.ids {
			if c, ok := ch.unacked[id]; ok {
				delete(ch.unacked, id)
				c.File.Close()
				ch.open++
			}
		}
	case TypeClosed:
		ch.open = max(0, ch.open-len(m.ids))
	case TypeReject:
		for _, id := range m.ids {
			if c, ok := ch.unacked[id]; ok {
				delete(ch.unacked, id)
				ev.Rejected = append(ev.Rejected, c)
			}
		}
	default:
		return Event{}, fmt.Errorf("recv: %w: worker sent %v", ErrProtocol, m.typ)
	}
	ch.compact()
	return ev, nil
}

// compact drops acknowledged ids from ch.order once they dominate it.
func (ch *Channel) compact() {
	if len(ch.order) < 64 || len(ch.order) < 2*len(ch.unacked) {
		return
	}
	ch.order = slices.DeleteFunc(ch.order, func(id uint64) bool {
		_, ok := ch.unacked[id]
		return !ok
	})
}

// SetReadDeadline makes a blocked or later Recv return an error wrapping
// os.ErrDeadlineExceeded at t; the zero time means no deadline. A Recv
// that times out has read nothing: the Channel stays usable, and Recv
// can be called again (after moving the deadline).
func (ch *Channel) SetReadDeadline(t time.Time) error {
	return ch.c.SetReadDeadline(t)
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
// Go library and examples/python/rr_worker.py do).
func (ch *Channel) Open() int {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.open
}

// Close closes the dispatcher's end of the channel, which makes blocked
// Send and Recv calls return, and returns every connection not yet
// acknowledged or rejected, in the order they were sent. The caller owns
// their Files: hand them to another worker or close them. Later calls
// return nothing.
func (ch *Channel) Close() ([]Conn, error) {
	err := ch.c.Close()
	ch.sendMu.Lock() // wait for a running Send to let go of the Files
	defer ch.sendMu.Unlock()
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if ch.closed {
		return nil, nil
	}
	ch.closed = true
	var left []Conn
	for _, id := range ch.order {
		if c, ok := ch.unacked[id]; ok {
			left = append(left, c)
			delete(ch.unacked, id)
		}
	}
	ch.order = nil
	if err != nil {
		err = fmt.Errorf("close round-robin channel: %w", err)
	}
	return left, err
}
