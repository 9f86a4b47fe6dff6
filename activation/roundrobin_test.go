package activation

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"github.com/cohort-dev/cohort/internal/testproc"
	"golang.org/x/sys/unix"
)

// rrSetup returns a dispatcher Channel and a demux over its other end with
// listeners named names (none opened yet).
func rrSetup(t *testing.T, n int) (*rr.Channel, *demux) {
	t.Helper()
	ch, wf, err := rr.NewPair()
	if err != nil {
		t.Fatal(err)
	}
	w, err := rr.NewWorker(wf)
	if err != nil {
		t.Fatal(err)
	}
	d := newDemux(w, n)
	t.Cleanup(func() {
		left, _ := ch.Close()
		for _, c := range left {
			c.Close()
		}
		d.mu.Lock()
		if !d.sockClosed {
			d.sockClosed = true
			w.Close()
		}
		for _, q := range d.queues {
			for _, dl := range q {
				dl.File.Close()
			}
		}
		d.mu.Unlock()
	})
	return ch, d
}

// sendConns connects n clients to a fresh 127.0.0.1 listener and sends the
// accepted sides for listener idx with ids from first on.
func sendConns(t *testing.T, ch *rr.Channel, idx uint16, first uint64, n int) []net.Conn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var clients []net.Conn
	var conns []rr.Conn
	for i := range n {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), wait)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		f, err := s.(*net.TCPConn).File()
		s.Close()
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
		conns = append(conns, rrConn(t, first+uint64(i), idx, f))
	}
	if err := ch.Send(conns...); err != nil {
		t.Fatal(err)
	}
	return clients
}

// wait bounds every blocking step of these tests: a lost message fails
// the test, naming what it waited for, instead of hanging it.
const wait = 10 * time.Second

// recvUntil applies events from ch until done reports true, for at most
// wait, and returns them; rejected connections are closed. what says what
// the test is waiting for.
func recvUntil(t *testing.T, ch *rr.Channel, what string, done func(evs []rr.Event) bool) []rr.Event {
	t.Helper()
	ch.SetReadDeadline(time.Now().Add(wait))
	defer ch.SetReadDeadline(time.Time{})
	var evs []rr.Event
	for !done(evs) {
		ev, err := ch.Recv()
		if err != nil {
			t.Fatalf("waiting for %s (got %v): %v", what, evs, err)
		}
		for _, c := range ev.Rejected {
			c.Close()
		}
		evs = append(evs, ev)
	}
	return evs
}

// recvIDs collects ids of events of type typ until it has want of them;
// other events are applied and dropped.
func recvIDs(t *testing.T, ch *rr.Channel, typ rr.Type, want int) []uint64 {
	t.Helper()
	var ids []uint64
	recvUntil(t, ch, fmt.Sprintf("%d %v ids", want, typ), func(evs []rr.Event) bool {
		ids = ids[:0]
		for _, ev := range evs {
			if ev.Type == typ {
				ids = append(ids, ev.IDs...)
			}
		}
		return len(ids) >= want
	})
	slices.Sort(ids)
	return ids
}

// acceptWithin calls l.Accept and fails the test if it does not return
// within wait.
func acceptWithin(t *testing.T, l net.Listener) (net.Conn, error) {
	t.Helper()
	type result struct {
		c   net.Conn
		err error
	}
	r := make(chan result, 1)
	go func() { // ends when Accept returns; at the latest when the test's cleanup closes the channel
		c, err := l.Accept()
		r <- result{c, err}
	}()
	select {
	case res := <-r:
		return res.c, res.err
	case <-time.After(wait):
		t.Fatalf("Accept on %s did not return within %v", l.Addr(), wait)
		return nil, nil
	}
}

func TestRoundRobinListeners(t *testing.T) {
	ch, d := rrSetup(t, 3)
	admin, err := d.listen(1, "admin")
	if err != nil {
		t.Fatal(err)
	}
	web, err := d.listen(0, "web")
	if err != nil {
		t.Fatal(err)
	}
	if got := web.Addr().String(); got != "web" {
		t.Fatalf("Addr = %q", got)
	}
	// 1 for listener 2 (never opened: rejected), 1 for listener 7 (unknown:
	// rejected), 3 for web, 2 for admin. The channel is read only by
	// Accept, so the first Accept reads them all.
	sendConns(t, ch, 2, 30, 1)
	sendConns(t, ch, 7, 40, 1)
	webClients := sendConns(t, ch, 0, 10, 3)
	sendConns(t, ch, 1, 20, 2)

	for i, client := range webClients {
		c, err := acceptWithin(t, web)
		if err != nil {
			t.Fatal(err)
		}
		if c.LocalAddr().String() != client.RemoteAddr().String() {
			t.Fatalf("conn %d local %s, client's remote %s", i, c.LocalAddr(), client.RemoteAddr())
		}
		c.Write([]byte("hi"))
		c.Close()
		// (No end of stream yet: the dispatcher's copy stays open until
		// it reads the ACK.)
		client.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 2)
		if _, err := io.ReadFull(client, b); string(b) != "hi" || err != nil {
			t.Fatalf("client %d read %q, %v", i, b, err)
		}
	}
	for range 2 {
		c, err := acceptWithin(t, admin)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if got := recvIDs(t, ch, rr.TypeReject, 2); !slices.Equal(got, []uint64{30, 40}) {
		t.Fatalf("rejected %v", got)
	}
	// Every Accept acknowledged before it returned, and every Close was
	// reported: 5 ACK ids, then 5 CLOSED ids (in any interleaving).
	recvUntil(t, ch, "5 acked and closed conns", func([]rr.Event) bool { return ch.Unacked() == 0 && ch.Open() == 0 })
}

// Close wakes a blocked Accept; queued conns of a closed listener are
// rejected; closing the last listener closes the channel after
// acknowledging what was taken.
func TestRoundRobinClose(t *testing.T) {
	ch, d := rrSetup(t, 2)
	a, _ := d.listen(0, "a")
	b, _ := d.listen(1, "b")

	accepted := make(chan error, 1)
	go func() { // ends when a is closed
		_, err := a.Accept()
		accepted <- err
	}()
	sendConns(t, ch, 1, 1, 2) // for b, in one message
	a.Close()
	select {
	case err := <-accepted:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close = %v, want net.ErrClosed", err)
		}
	case <-time.After(wait):
		t.Fatal("Close did not wake Accept")
	}
	c, err := acceptWithin(t, b)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	b.Close() // the last listener: ack 1, reject 2 (queued), close
	var acked, rejected []uint64
	ch.SetReadDeadline(time.Now().Add(wait))
	for {
		ev, err := ch.Recv()
		if errors.Is(err, net.ErrClosed) {
			break
		}
		if err != nil {
			t.Fatalf("waiting for the worker to close the channel (acked %v, rejected %v): %v", acked, rejected, err)
		}
		switch ev.Type {
		case rr.TypeAck:
			acked = append(acked, ev.IDs...)
		case rr.TypeReject:
			rejected = append(rejected, ev.IDs...)
		}
		for _, c := range ev.Rejected {
			c.Close()
		}
	}
	if !slices.Equal(acked, []uint64{1}) || !slices.Equal(rejected, []uint64{2}) || ch.Unacked() != 0 {
		t.Fatalf("acked %v, rejected %v, unacked %d", acked, rejected, ch.Unacked())
	}
	if _, err := acceptWithin(t, b); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept on closed listener = %v", err)
	}
	if _, err := d.listen(0, "a"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("listen after channel close = %v", err)
	}
}

// A malformed message from the dispatcher ends the channel: Accept fails
// with ErrProtocol, what is queued goes back as REJECT, then the channel
// closes.
func TestRoundRobinProtocolError(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	raw := fds[0]
	defer unix.Close(raw)
	w, err := rr.NewWorker(os.NewFile(uintptr(fds[1]), rr.FDName))
	if err != nil {
		t.Fatal(err)
	}
	d := newDemux(w, 2)
	l, _ := d.listen(0, "x")
	d.listen(1, "y")
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	dn := int(devnull.Fd())
	// CONNS {id 7, listener 1}, well formed, then a version 9 message.
	conns := []byte{1, 1, 1, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}
	bad := slices.Clone(conns)
	bad[0] = 9
	for _, m := range [][]byte{conns, bad} {
		if err := unix.Sendmsg(raw, m, unix.UnixRights(dn), nil, 0); err != nil {
			t.Fatal(err)
		}
	}
	before := testproc.OpenFDs(t)
	if _, err := acceptWithin(t, l); !errors.Is(err, rr.ErrProtocol) {
		t.Fatalf("Accept = %v, want ErrProtocol", err)
	}
	if after := testproc.OpenFDs(t); after != before-2 { // the channel itself is closed: its socket and the eventfd that wakes its Recv
		t.Fatalf("%d fds before, %d after", before, after)
	}
	unix.SetsockoptTimeval(raw, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 10})
	b := make([]byte, 64)
	n, err := unix.Read(raw, b)
	if err != nil || string(b[:n]) != string([]byte{1, 4, 1, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("read %x, %v, want REJECT [7]", b[:n], err)
	}
	if n, err := unix.Read(raw, b); n != 0 || err != nil {
		t.Fatalf("read %x, %v, want end of stream", b[:n], err)
	}
}

// The protocol lets a worker use a connection only after acknowledging it
// (otherwise, should the worker die, the dispatcher hands it to another
// one, and it is served twice). Accept acknowledges each connection before
// returning it, also when more are queued behind it; before, the ACK of a
// connection with others queued waited for a later Accept, which might
// never come.
func TestRoundRobinAckBeforeUse(t *testing.T) {
	ch, d := rrSetup(t, 1)
	l, _ := d.listen(0, "web")
	sendConns(t, ch, 0, 1, 2) // one message: 2 stays queued while 1 is used
	c, err := acceptWithin(t, l)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := recvIDs(t, ch, rr.TypeAck, 1); !slices.Equal(got, []uint64{1}) {
		t.Fatalf("acked %v, want [1]", got)
	}
	if n := ch.Unacked(); n != 1 {
		t.Fatalf("Unacked = %d, want 1 (the queued one)", n)
	}
	c2, err := acceptWithin(t, l)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if got := recvIDs(t, ch, rr.TypeAck, 1); !slices.Equal(got, []uint64{2}) {
		t.Fatalf("acked %v, want [2]", got)
	}
}

// Close wakes an Accept of its listener whatever that Accept is doing,
// while other listeners stay open; several goroutines accept on each
// listener (Accept is called concurrently, as by http.Server and by
// programs that accept in a pool). The race detector checks that only one
// goroutine reads the channel at a time.
func TestRoundRobinCloseWhileAccepting(t *testing.T) {
	for i := range 50 {
		ch, d := rrSetup(t, 2)
		a, _ := d.listen(0, "a")
		b, _ := d.listen(1, "b")
		ended := make(chan error, 3)
		for range cap(ended) {
			go func() { // ends when a is closed
				for {
					c, err := a.Accept()
					if err != nil {
						ended <- err
						return
					}
					c.Close()
				}
			}()
		}
		// Conns for both listeners in each message, so that taking one
		// for a leaves others queued.
		for id := uint64(1); id < 20; id += 4 {
			sendMixed(t, ch, id)
		}
		a.Close()
		for range cap(ended) {
			select {
			case err := <-ended:
				if !errors.Is(err, net.ErrClosed) {
					t.Fatalf("round %d: Accept on closed a = %v", i, err)
				}
			case <-time.After(wait):
				t.Fatalf("round %d: Close(a) did not wake every Accept on a within %v", i, wait)
			}
		}
		// b still works: what was queued for it is served, and acked.
		c, err := acceptWithin(t, b)
		if err != nil {
			t.Fatalf("round %d: Accept on b after Close(a) = %v", i, err)
		}
		c.Close()
	}
}

// sendMixed sends ids id..id+3 in one message, alternating listeners 0
// and 1.
func sendMixed(t *testing.T, ch *rr.Channel, id uint64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conns []rr.Conn
	for i := range uint64(4) {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), wait)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		f, err := s.(*net.TCPConn).File()
		s.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, rrConn(t, id+i, uint16(i%2), f))
	}
	if err := ch.Send(conns...); err != nil {
		t.Fatal(err)
	}
}

// A connection whose ACK cannot be sent is not the worker's: the
// dispatcher took the channel back (the worker was too slow) and hands it
// to another worker, so Accept must drop it, not serve it a second time.
// Here conn 2 waits in the listener's queue when the dispatcher's end
// goes; its client must see the worker's copy closed. (At 57c59ff Accept
// returned it.)
func TestRoundRobinNoUseWithoutAck(t *testing.T) {
	ch, d := rrSetup(t, 1)
	l, _ := d.listen(0, "web")
	clients := sendConns(t, ch, 0, 1, 2) // one message: 2 stays queued while 1 is used
	c, err := acceptWithin(t, l)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	recvIDs(t, ch, rr.TypeAck, 1)
	left, _ := ch.Close()
	if len(left) != 1 || left[0].ID != 2 {
		t.Fatalf("dispatcher took back %+v, want conn 2", left)
	}
	left[0].Close() // as if handed to, and served by, another worker
	c2, err := acceptWithin(t, l)
	if err == nil {
		c2.Close()
		t.Fatalf("Accept returned conn %v although its ACK could not be sent", c2.RemoteAddr())
	}
	if !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept = %v, want net.ErrClosed", err)
	}
	clients[1].SetReadDeadline(time.Now().Add(wait))
	if n, err := clients[1].Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("client of conn 2 read %d bytes, %v; want EOF (every copy closed)", n, err)
	}
}

// TestRoundRobinCloseEndsTheConnection: a worker's Close of a handed-over
// connection ends it for the client at once, although the dispatcher has
// not read the ACK and still holds its copy; an abort (SetLinger(0)) is
// still a reset, sent when the dispatcher's copy goes.
func TestRoundRobinCloseEndsTheConnection(t *testing.T) {
	ch, d := rrSetup(t, 1)
	l, err := d.listen(0, "web")
	if err != nil {
		t.Fatal(err)
	}
	clients := sendConns(t, ch, 0, 1, 2)
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.SetNonblock(pair[0], true) // os.File's deadlines need the poller
	unixClient := os.NewFile(uintptr(pair[0]), "unix-client")
	t.Cleanup(func() { unixClient.Close() })
	if err := ch.Send(rrConn(t, 3, 0, os.NewFile(uintptr(pair[1]), "unix-server"))); err != nil {
		t.Fatal(err)
	}
	var served [3]net.Conn
	for i := range served {
		c, err := acceptWithin(t, l)
		if err != nil {
			t.Fatal(err)
		}
		served[i] = c
	}

	// Graceful: the reply, then EOF, while the dispatcher's copies are open.
	for i, client := range []io.Reader{clients[0], unixClient} {
		c := served[[]int{0, 2}[i]]
		if _, err := c.Write([]byte("bye")); err != nil {
			t.Fatal(err)
		}
		c.Close()
		done := make(chan error, 1)
		go func() { // ends at the read deadline at the latest
			b, err := io.ReadAll(client)
			if err == nil && string(b) != "bye" {
				err = fmt.Errorf("read %q, want %q", b, "bye")
			}
			done <- err
		}()
		if err := client.(interface{ SetReadDeadline(time.Time) error }).SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("client %d after the worker's Close, with the dispatcher's copy open: %v", i, err)
		}
	}

	// Abort: nothing reaches the client until the dispatcher's copy goes,
	// and then a reset, not an end of stream.
	ab := served[1].(interface{ SetLinger(int) error })
	if err := ab.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	served[1].Close()
	clients[1].SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := clients[1].Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("aborted connection, dispatcher's copy open: read %d, %v; want a timeout", n, err)
	}
	recvIDs(t, ch, rr.TypeAck, 3) // closes the dispatcher's copies
	clients[1].SetReadDeadline(time.Now().Add(wait))
	if _, err := clients[1].Read(make([]byte, 1)); !errors.Is(err, unix.ECONNRESET) {
		t.Fatalf("aborted connection after the dispatcher's close: %v; want ECONNRESET", err)
	}
}

// rrConn makes the round-robin Conn id of f (which it closes), accepted
// on listener; the external tests (package activation_test) use it too.
func rrConn(t testing.TB, id uint64, listener uint16, f *os.File) rr.Conn {
	t.Helper()
	c, err := rr.FileConn(f, listener)
	if err != nil {
		t.Fatal(err)
	}
	c.ID = id
	return c
}
