package activation

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
)

// demux reads the round-robin channel on behalf of all round-robin
// listeners of a process. It has no goroutine of its own: whichever Accept
// finds its queue empty reads the channel (one at a time) and queues what
// arrives for each listener.
type demux struct {
	w *rr.Worker

	mu          sync.Mutex
	cond        *sync.Cond // signalled when reading or flushing ends, or a listener closes
	queues      [][]rr.Delivery
	listening   []*rrListener // open listener by index, or nil
	open        int           // number of open listeners
	queued      int           // total queued deliveries
	reading     *rrListener   // the listener whose Accept is reading, or nil
	interrupted bool          // a read deadline was set to wake the reader
	err         error         // set once reading has ended for good
	flushing    bool
	sockClosed  bool
	acked       uint64      // number of ids appended to ack so far
	ackSent     uint64      // how many of those are written (or the channel broke)
	ackOK       uint64      // how many of those are written: acks go out in order, the first failure ends the channel
	ack         []uint64    // taken, not yet acknowledged
	closed      []uint64    // closed by the application, not yet reported
	closedTimer *time.Timer // flushes closed when no ACK carries it first
	timerArmed  bool
	reject      []uint64 // not taken, fds closed, not yet reported
}

func newDemux(w *rr.Worker, n int) *demux {
	d := &demux{w: w, queues: make([][]rr.Delivery, n), listening: make([]*rrListener, n)}
	d.cond = sync.NewCond(&d.mu)
	return d
}

func (d *demux) listen(i int, name string) (*rrListener, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.sockClosed {
		return nil, fmt.Errorf("round-robin channel: %w", net.ErrClosed)
	}
	l := &rrListener{d: d, index: i, addr: rrAddr(name)}
	d.listening[i] = l
	d.open++
	return l, nil
}

// accept implements rrListener.Accept.
//
// Invariant: ids are pending in ack, reject or closed only while a
// flushLocked is running, which sends them before it returns; so a reader
// never has to flush, and never releases d.mu between deciding to read
// and marking itself as the reader (Close relies on seeing it).
func (d *demux) accept(l *rrListener) (net.Conn, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for {
		if l.closed {
			return nil, fmt.Errorf("accept on %s: %w", l.addr, net.ErrClosed)
		}
		if q := d.queues[l.index]; len(q) > 0 {
			dl := q[0]
			q[0] = rr.Delivery{}
			d.queues[l.index] = q[1:]
			d.queued--
			if !d.takeLocked(dl.ID) {
				// Not acknowledged: the dispatcher hands it to another
				// worker (or closed it); using it too would serve it twice.
				dl.File.Close()
				continue
			}
			c, err := d.conn(dl)
			if err != nil {
				continue // acknowledged and dropped: handing it to another worker would fail too
			}
			return c, nil
		}
		if d.err != nil {
			return nil, fmt.Errorf("accept on %s: %w", l.addr, d.err)
		}
		if d.reading != nil {
			d.cond.Wait()
			continue
		}
		if d.interrupted {
			d.w.SetReadDeadline(time.Time{})
			d.interrupted = false
		}
		d.reading = l
		d.mu.Unlock()
		ds, err := d.w.Recv()
		d.mu.Lock()
		d.reading = nil
		d.cond.Broadcast()
		switch {
		case err == nil:
			d.deliverLocked(ds)
		case errors.Is(err, os.ErrDeadlineExceeded) && !d.sockClosed:
			// woken by Close; loop to look at l.closed
		case errors.Is(err, net.ErrClosed):
			// The dispatcher is gone or took the channel back (or we
			// closed it). What is queued goes to Accept, which serves a
			// connection only if its ACK still goes out: it does not
			// once the dispatcher's end is shut, so nothing the
			// dispatcher hands to another worker is served here too.
			if d.err == nil {
				d.err = err
			}
		default:
			if d.err == nil {
				d.err = err
			}
			d.shutdownLocked()
		}
	}
}

// takeLocked acknowledges id and reports, once the ACK is written or the
// channel is broken, whether it was written: the protocol lets a worker
// use a connection only after its ACK, since a dispatcher that does not
// get it (it shut the channel down because this worker was too slow, or
// it is gone) hands the connection to another worker. Acks of
// connections taken at the same time by several goroutines go out
// together.
func (d *demux) takeLocked(id uint64) bool {
	if d.sockClosed {
		return false
	}
	d.ack = append(d.ack, id)
	d.acked++
	mine := d.acked
	d.flushLocked()
	for d.ackSent < mine && !d.sockClosed {
		d.cond.Wait() // another goroutine's flushLocked is sending it
	}
	return d.ackOK >= mine
}

// deliverLocked queues ds for their listeners and rejects the ones no open
// listener takes.
func (d *demux) deliverLocked(ds []rr.Delivery) {
	for _, dl := range ds {
		i := int(dl.Listener)
		if i < len(d.listening) && d.listening[i] != nil && d.err == nil {
			d.queues[i] = append(d.queues[i], dl)
			d.queued++
			continue
		}
		dl.File.Close()
		d.reject = append(d.reject, dl.ID)
	}
	if len(d.reject) > 0 {
		d.flushLocked()
	}
}

// conn turns a taken delivery into a net.Conn that reports its Close.
func (d *demux) conn(dl rr.Delivery) (net.Conn, error) {
	c, err := net.FileConn(dl.File)
	dl.File.Close()
	if err != nil {
		return nil, err
	}
	onClose := func() { d.connClosed(dl.ID) }
	if tc, ok := c.(*net.TCPConn); ok {
		return &tcpConn{TCPConn: tc, onClose: onClose}, nil
	}
	return &otherConn{Conn: c, onClose: onClose}, nil
}

// closedDelay is how long a CLOSED may wait for an ACK to travel with.
// A CLOSED only feeds the dispatcher's count of open connections (for
// least-connections and p2c), which a few milliseconds do not spoil;
// sent on its own, it costs the dispatcher a wake-up per connection, as
// much as the ACK (issue 19). Under load the next ACK carries it (the
// two messages are read in one wake-up); an idle worker sends it when
// the timer fires.
const closedDelay = 5 * time.Millisecond

func (d *demux) connClosed(id uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.sockClosed {
		return
	}
	d.closed = append(d.closed, id)
	if len(d.closed) >= rr.MaxIDs {
		d.flushLocked()
		return
	}
	if !d.timerArmed {
		d.timerArmed = true
		if d.closedTimer == nil {
			d.closedTimer = time.AfterFunc(closedDelay, d.flushClosed)
		} else {
			d.closedTimer.Reset(closedDelay)
		}
	}
}

// flushClosed sends the CLOSED ids no ACK has carried.
func (d *demux) flushClosed() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.timerArmed = false
	d.flushLocked()
}

// flushLocked sends pending ACK, REJECT and CLOSED ids, in that order,
// unless another goroutine is already sending (it then sends ours too). It
// is called and returns with d.mu held, and releases it while sending.
func (d *demux) flushLocked() {
	if d.flushing {
		return
	}
	d.flushing = true
	for !d.sockClosed && len(d.ack)+len(d.reject)+len(d.closed) > 0 {
		ack, reject, closed := d.ack, d.reject, d.closed
		d.ack, d.reject, d.closed = nil, nil, nil
		if len(closed) > 0 && d.timerArmed {
			d.closedTimer.Stop()
			d.timerArmed = false
		}
		d.mu.Unlock()
		err := d.w.Send(rr.TypeAck, ack)
		ackErr := err
		if err == nil {
			err = d.w.Send(rr.TypeReject, reject)
		}
		if err == nil {
			err = d.w.Send(rr.TypeClosed, closed)
		}
		d.mu.Lock()
		d.ackSent += uint64(len(ack))
		if ackErr == nil {
			d.ackOK += uint64(len(ack))
		}
		if err != nil {
			// The dispatcher is gone or the channel broke: it can no
			// longer learn anything, so stop reporting and stop reading
			// (what is queued is still served).
			if d.err == nil {
				d.err = fmt.Errorf("round-robin channel: %w: %w", err, net.ErrClosed)
			}
			d.ack, d.reject, d.closed = nil, nil, nil
			d.sockClosed = true
			d.w.Close()
		}
		d.cond.Broadcast() // takeLocked waits for its ACK
	}
	d.flushing = false
	d.cond.Broadcast()
}

// shutdownLocked rejects everything queued, reports it and closes the
// channel, so that the dispatcher hands what the worker did not take to
// another worker.
func (d *demux) shutdownLocked() {
	for i, q := range d.queues {
		for _, dl := range q {
			dl.File.Close()
			d.reject = append(d.reject, dl.ID)
		}
		d.queues[i] = nil
	}
	d.queued = 0
	for d.flushing {
		d.cond.Wait()
	}
	d.flushLocked()
	if !d.sockClosed {
		d.sockClosed = true
		d.w.Close()
	}
	d.cond.Broadcast()
}

// close implements rrListener.Close.
func (d *demux) close(l *rrListener) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if l.closed {
		return fmt.Errorf("close %s: %w", l.addr, net.ErrClosed)
	}
	l.closed = true
	d.listening[l.index] = nil
	d.open--
	for _, dl := range d.queues[l.index] {
		dl.File.Close()
		d.reject = append(d.reject, dl.ID)
	}
	d.queued -= len(d.queues[l.index])
	d.queues[l.index] = nil
	if d.open == 0 {
		if d.err == nil {
			d.err = fmt.Errorf("round-robin channel: all listeners closed: %w", net.ErrClosed)
		}
		d.shutdownLocked() // also wakes a blocked reader: its Recv fails
		return nil
	}
	if d.reading == l && !d.interrupted {
		d.w.SetReadDeadline(time.Now())
		d.interrupted = true
	}
	d.flushLocked()
	d.cond.Broadcast()
	return nil
}

// rrListener is a round-robin listener: a net.Listener over the channel.
type rrListener struct {
	d      *demux
	index  int
	addr   rrAddr
	closed bool // under d.mu
}

// Accept returns the next connection the dispatcher handed over for this
// listener, after the dispatcher has been sent its ACK (so that, should
// this process die, the connection is not handed to another worker while
// this one may have used it). The first Accept of the process sends
// READY=1.
func (l *rrListener) Accept() (net.Conn, error) {
	autoReady()
	return l.d.accept(l)
}

// Close stops this listener: connections queued for it are rejected (the
// dispatcher hands them to another worker) and a blocked Accept returns.
func (l *rrListener) Close() error { return l.d.close(l) }

// Addr returns the listener's name, with network "cohort-rr".
func (l *rrListener) Addr() net.Addr { return l.addr }

// rrAddr is the address of a round-robin listener: its name.
type rrAddr string

func (a rrAddr) Network() string { return rr.FDName }
func (a rrAddr) String() string  { return string(a) }

// tcpConn is a handed-over TCP connection; embedding keeps *net.TCPConn's
// methods (ReadFrom for sendfile, CloseWrite, keep-alive settings).
type tcpConn struct {
	*net.TCPConn
	once    sync.Once
	onClose func()
	// abort is set by SetLinger(0): the application wants Close to reset
	// the connection, which only the last close of the socket does.
	abort atomic.Bool
}

// SetLinger is net.TCPConn's, noting whether Close should reset.
func (c *tcpConn) SetLinger(sec int) error {
	err := c.TCPConn.SetLinger(sec)
	if err == nil {
		c.abort.Store(sec == 0)
	}
	return err
}

// Close ends the connection, as it would without a dispatcher. The
// dispatcher keeps its copy of the socket until it reads this worker's
// ACK, which it does lazily (up to 1 ms late while connections keep
// coming): a close(2) alone would leave the connection open until then,
// so a client waiting for the server's FIN would wait too, and the
// dispatcher's close, the last, would pay for the teardown (sending the
// FIN and waking the client: ~6 µs of its CPU per connection, issue 19).
// Shutting the write side down first sends the FIN now. An abort
// (SetLinger(0)) is left to the last close, which sends the reset.
func (c *tcpConn) Close() error {
	if !c.abort.Load() {
		c.TCPConn.CloseWrite() // fails only if closed already: Close says so
	}
	err := c.TCPConn.Close()
	c.once.Do(c.onClose)
	return err
}

// otherConn is a handed-over connection of another kind (a unix socket).
type otherConn struct {
	net.Conn
	once    sync.Once
	onClose func()
}

// Close ends the connection now, as tcpConn's does.
func (c *otherConn) Close() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	err := c.Conn.Close()
	c.once.Do(c.onClose)
	return err
}
