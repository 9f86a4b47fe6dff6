package rr

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testproc"
)

// conns makes n Conns with ids from first on, over real TCP connections.
func conns(t testing.TB, first uint64, n int) []Conn {
	t.Helper()
	_, files := tcpConns(t, n)
	cs := make([]Conn, n)
	for i, f := range files {
		cs[i] = fileConn(t, first+uint64(i), 0, f)
	}
	t.Cleanup(func() {
		for _, f := range files {
			f.Close()
		}
	})
	return cs
}

// recvEvent is ch.Recv that fails the test on an error.
func recvEvent(t *testing.T, ch *Channel) Event {
	t.Helper()
	ev, err := ch.Recv()
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

// The least-connections count trusts only ids the worker was sent: a
// CLOSED of an id that is not open, an ACK or REJECT of an id that is not
// in flight, is ignored and counted. (At 57c59ff a CLOSED of any id
// lowered Open.)
func TestForeignIDsAreIgnored(t *testing.T) {
	ch, w := newPair(t)
	cs := conns(t, 1, 3)
	if err := ch.Send(cs...); err != nil {
		t.Fatal(err)
	}
	ds, err := w.Recv()
	if err != nil || len(ds) != 3 {
		t.Fatalf("Recv = %v, %v", ds, err)
	}
	for _, d := range ds {
		d.File.Close()
	}
	if err := w.Send(TypeAck, []uint64{1, 2, 3, 77}); err != nil {
		t.Fatal(err)
	}
	if ev := recvEvent(t, ch); ev.Type != TypeAck || ev.Ignored != 1 {
		t.Fatalf("ACK of 1, 2, 3 and the foreign 77: %+v, want 1 ignored", ev)
	}
	// 99 and 100 were never sent, 77 never acknowledged, 1 is closed
	// twice: only the first CLOSED of 1 counts.
	if err := w.Send(TypeClosed, []uint64{99, 100, 77, 1, 1}); err != nil {
		t.Fatal(err)
	}
	if ev := recvEvent(t, ch); ev.Ignored != 4 {
		t.Fatalf("CLOSED event %+v, want 4 ignored", ev)
	}
	if got := ch.Open(); got != 2 {
		t.Fatalf("Open = %d after a CLOSED of one real and four foreign ids, want 2", got)
	}
	if err := w.Send(TypeReject, []uint64{2, 5}); err != nil { // 2 is acknowledged: not the worker's to reject
		t.Fatal(err)
	}
	if ev := recvEvent(t, ch); ev.Ignored != 2 || len(ev.Rejected) != 0 {
		t.Fatalf("REJECT event %+v, want 2 ignored, nothing handed back", ev)
	}
	if got := ch.Ignored(); got != 7 {
		t.Fatalf("Ignored = %d, want 7", got)
	}
	if got := ch.Open(); got != 2 {
		t.Fatalf("Open = %d, want 2", got)
	}
}

// HELLO is a worker's first word; any well-formed message counts as
// speaking.
func TestHello(t *testing.T) {
	ch, w := newPair(t)
	if ch.Spoke() {
		t.Fatal("Spoke before anything was sent")
	}
	if err := w.Hello(); err != nil {
		t.Fatal(err)
	}
	if ev := recvEvent(t, ch); ev.Type != TypeHello || len(ev.IDs) != 0 {
		t.Fatalf("event %+v, want HELLO", ev)
	}
	if !ch.Spoke() {
		t.Fatal("Spoke = false after HELLO")
	}
	// A dispatcher never sends HELLO; a worker refuses it.
	if err := ch.s.send(appendHello(nil), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); !errors.Is(err, ErrProtocol) {
		t.Fatalf("worker Recv of HELLO = %v, want ErrProtocol", err)
	}
}

// TrySend never waits: once the worker's queue is full it reports
// ErrWouldBlock and hands back the unsent rest, which the Channel does
// not count; WaitWritable returns once the worker has read.
func TestTrySendFull(t *testing.T) {
	ch, w := newPair(t)
	cs := conns(t, 1, 1)
	sent := 0
	start := time.Now()
	var err error
	for id := uint64(1); ; id++ {
		c := cs[0]
		c.ID = id
		var n int
		n, err = ch.TrySend(c)
		if err != nil {
			if n != 0 {
				t.Fatalf("TrySend of one conn failed after sending %d", n)
			}
			break
		}
		sent++
		if time.Since(start) > 10*time.Second || sent > 100000 {
			t.Fatalf("TrySend sent %d messages without filling the queue", sent)
		}
	}
	if !errors.Is(err, ErrWouldBlock) || errors.Is(err, ErrNotSent) {
		t.Fatalf("TrySend to a full queue = %v, want ErrWouldBlock", err)
	}
	if got := ch.Unacked(); got != sent {
		t.Fatalf("Unacked = %d, want the %d sent", got, sent)
	}
	t.Logf("the queue took %d one-fd messages", sent)

	waited := make(chan error, 1)
	go func() { waited <- ch.WaitWritable() }()
	select {
	case err := <-waited:
		t.Fatalf("WaitWritable returned %v on a full queue", err)
	case <-time.After(50 * time.Millisecond):
	}
	// The kernel reports room once three quarters of the queue are read.
	for range sent {
		ds, err := w.Recv()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range ds {
			d.File.Close()
		}
	}
	select {
	case err := <-waited:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WaitWritable did not return after the worker read its queue")
	}
	c := cs[0]
	c.ID = 1 << 40
	if n, err := ch.TrySend(c); n != 1 || err != nil {
		t.Fatalf("TrySend after room appeared = %d, %v", n, err)
	}
}

// Shutdown takes the channel back from a worker that is still running:
// its next ACK fails, the ACKs it sent before are still read, then end of
// stream; the worker reads what it was sent, then end of stream; Close
// returns exactly what was not acknowledged in time.
func TestShutdownKeepsEarlierAcks(t *testing.T) {
	ch, w := newPair(t)
	cs := conns(t, 1, 4)
	if err := ch.Send(cs...); err != nil {
		t.Fatal(err)
	}
	if err := w.Send(TypeAck, []uint64{1}); err != nil {
		t.Fatal(err)
	}
	if at := ch.Oldest(); at.IsZero() || time.Since(at) > 10*time.Second {
		t.Fatalf("Oldest = %v with 4 conns in flight", at)
	}

	// Recv is blocked when Shutdown comes: it must wake.
	got := make(chan []Event, 1)
	go func() {
		var evs []Event
		for {
			ev, err := ch.Recv()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					t.Errorf("Recv after Shutdown = %v, want net.ErrClosed", err)
				}
				got <- evs
				return
			}
			evs = append(evs, ev)
		}
	}()
	time.Sleep(20 * time.Millisecond)
	if err := ch.Shutdown(); err != nil {
		t.Fatal(err)
	}
	var evs []Event
	select {
	case evs = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("Recv did not end after Shutdown")
	}
	if len(evs) != 1 || evs[0].Type != TypeAck || !slices.Equal(evs[0].IDs, []uint64{1}) {
		t.Fatalf("events after Shutdown %+v, want the ACK of 1", evs)
	}
	if err := w.Send(TypeAck, []uint64{2}); !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("worker's ACK after Shutdown = %v, want EPIPE", err)
	}
	ds, err := w.Recv()
	if err != nil || len(ds) != 4 {
		t.Fatalf("worker Recv after Shutdown = %v, %v, want the 4 conns it was sent", ds, err)
	}
	for _, d := range ds {
		d.File.Close()
	}
	if _, err := w.Recv(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("worker Recv at the end = %v, want net.ErrClosed", err)
	}
	if _, err := ch.TrySend(conns(t, 10, 1)...); !errors.Is(err, ErrNotSent) {
		t.Fatalf("TrySend after Shutdown = %v, want ErrNotSent", err)
	}
	left, err := ch.Close()
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint64
	for _, c := range left {
		ids = append(ids, c.ID)
	}
	if !slices.Equal(ids, []uint64{2, 3, 4}) {
		t.Fatalf("Close returned %v, want [2 3 4]", ids)
	}
	for _, c := range left {
		c.Close()
	}
}

// Oldest follows the oldest connection still in flight, including one
// re-sent after a REJECT.
func TestOldest(t *testing.T) {
	ch, w := newPair(t)
	if !ch.Oldest().IsZero() {
		t.Fatal("Oldest is set on an empty channel")
	}
	cs := conns(t, 1, 3)
	if err := ch.Send(cs[0]); err != nil {
		t.Fatal(err)
	}
	first := ch.Oldest()
	time.Sleep(5 * time.Millisecond)
	if err := ch.Send(cs[1:]...); err != nil {
		t.Fatal(err)
	}
	if got := ch.Oldest(); !got.Equal(first) {
		t.Fatalf("Oldest = %v, want the first send %v", got, first)
	}
	if err := w.Send(TypeReject, []uint64{1}); err != nil {
		t.Fatal(err)
	}
	ev := recvEvent(t, ch)
	if len(ev.Rejected) != 1 {
		t.Fatalf("REJECT event %+v", ev)
	}
	if got := ch.Oldest(); !got.After(first) {
		t.Fatalf("Oldest = %v after conn 1 was rejected, want later than %v", got, first)
	}
	if err := ch.Send(ev.Rejected...); err != nil { // back on the same channel: now the newest
		t.Fatal(err)
	}
	second := ch.Oldest()
	if err := w.Send(TypeAck, []uint64{2, 3}); err != nil {
		t.Fatal(err)
	}
	recvEvent(t, ch)
	if got := ch.Oldest(); !got.After(second) {
		t.Fatalf("Oldest = %v with only the re-sent conn 1 in flight, want its re-send time (after %v)", got, second)
	}
	if err := w.Send(TypeAck, []uint64{1}); err != nil {
		t.Fatal(err)
	}
	recvEvent(t, ch)
	if !ch.Oldest().IsZero() {
		t.Fatal("Oldest is set with nothing in flight")
	}
}

// TryRecv reads what is queued in one system call and hands it out a
// message at a time; a hostile message among them (fds attached) ends
// the channel there, and neither its fds nor those of the messages read
// with it stay open. A message that comes after a short read is read by
// the call after the one that reports ErrWouldBlock.
func TestBatchedRecv(t *testing.T) {
	ch, w := newPair(t)
	cs := conns(t, 1, 4)
	if err := ch.Send(cs...); err != nil {
		t.Fatal(err)
	}
	if ds, err := w.Recv(); err != nil || len(ds) != 4 {
		t.Fatalf("Recv = %v, %v", ds, err)
	} else {
		for _, d := range ds {
			d.File.Close()
		}
	}
	tryRecv := func(what string) Event {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			ev, err := ch.TryRecv()
			if errors.Is(err, ErrWouldBlock) && time.Now().Before(deadline) {
				continue
			}
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			return ev
		}
	}

	// A short read, then a message that comes later, read in its turn.
	for id := uint64(1); id <= 2; id++ {
		if err := w.Send(TypeAck, []uint64{id}); err != nil {
			t.Fatal(err)
		}
		if ev := tryRecv(fmt.Sprintf("ACK %d", id)); ev.Type != TypeAck || !slices.Equal(ev.IDs, []uint64{id}) {
			t.Fatalf("ACK %d: %+v", id, ev)
		}
		if _, err := ch.TryRecv(); !errors.Is(err, ErrWouldBlock) {
			t.Fatalf("TryRecv after the only message (ACK %d): %v, want ErrWouldBlock", id, err)
		}
	}

	// Three messages queued together: one read, and the hostile one ends it.
	before := testproc.OpenFDs(t)
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	dn := int(devnull.Fd())
	if err := w.Send(TypeAck, []uint64{3}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		// A worker must not send fds; reach under Worker.Send to do it.
		if err := w.s.send(appendIDs(nil, TypeClosed, []uint64{3}), []int{dn, dn, dn}); err != nil {
			t.Fatal(err)
		}
	}
	devnull.Close()
	if ev := tryRecv("ACK 3"); ev.Type != TypeAck || !slices.Equal(ev.IDs, []uint64{3}) {
		t.Fatalf("ACK 3: %+v", ev)
	}
	if n := ch.Buffered(); n != 2 {
		t.Fatalf("after the first of three queued messages: %d buffered, want 2 (one read)", n)
	}
	if _, err := ch.TryRecv(); !errors.Is(err, ErrProtocol) {
		t.Fatalf("a CLOSED with fds: %v, want ErrProtocol", err)
	}
	if n := ch.Buffered(); n != 0 {
		t.Fatalf("after a protocol error: %d buffered, want 0", n)
	}
	if after := testproc.OpenFDs(t); after != before-1 { // ACK 3 closed the dispatcher's copy of connection 3
		t.Fatalf("%d fds before the hostile messages, %d after, want %d", before, after, before-1)
	}
}

// A close of an acknowledged connection can wait (a worker set SO_LINGER
// again after Conn.Close turned it off, and its client does not read; the
// dispatcher's close guard ends such a wait). The Channel must not hold
// its lock meanwhile: the guard's own watcher asks Oldest, and a
// watcher stuck behind the close it should end leaves the close to wait
// out the linger time, whatever the guard. (Until this test, ACK's close
// ran under the lock.)
func TestWaitingCloseHoldsNoLock(t *testing.T) {
	ch, w := newPair(t)
	closing := make(chan struct{})
	release := make(chan struct{})
	defer close(release)
	ch.closeConn = func(c Conn) error {
		close(closing)
		<-release // the close that waits
		return c.Close()
	}
	cs := conns(t, 1, 2)
	if err := ch.Send(cs...); err != nil {
		t.Fatal(err)
	}
	if err := w.Send(TypeAck, []uint64{1}); err != nil {
		t.Fatal(err)
	}
	go ch.Recv() // applies the ACK, and waits in the close of conn 1
	select {
	case <-closing:
	case <-time.After(5 * time.Second):
		t.Fatal("the ACK was not applied within 5 s")
	}
	done := make(chan int)
	go func() {
		ch.Oldest()
		done <- ch.Unacked()
	}()
	select {
	case n := <-done:
		if n != 1 {
			t.Fatalf("Unacked = %d during the close, want 1", n)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Oldest waited for the close of an acknowledged connection: it holds the Channel's lock")
	}
}
