package rr

import (
	"bytes"
	"errors"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testproc"
	"golang.org/x/sys/unix"
)

// FuzzParse checks that parse never panics and that every message it
// accepts encodes back to the same bytes. The seed corpus is in
// testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	f.Add(appendConns(nil, []entry{{id: 1, listener: 0}}))
	f.Add(appendIDs(nil, TypeAck, []uint64{1, 2, 3}))
	f.Add(appendHello(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parse(b)
		if err != nil {
			return
		}
		var again []byte
		switch m.typ {
		case TypeConns:
			again = appendConns(nil, m.entries)
		case TypeHello:
			again = appendHello(nil)
		default:
			again = appendIDs(nil, m.typ, m.ids)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("parse(%x) = %+v, which encodes as %x", b, m, again)
		}
	})
}

// FuzzRecv plays a hostile worker: after the dispatcher sent connections
// 1 to 4, the worker sends any sequence of messages (the input: each
// message prefixed by its length, u16 little-endian) and closes its end.
// Recv must never panic, must apply exactly the ids a correct model
// applies (ACK and REJECT of ids in flight, CLOSED of ids acknowledged and
// open), count the rest in Ignored, stop at the first malformed message,
// and leak no fd. The seed corpus is in testdata/fuzz/FuzzRecv.
func FuzzRecv(f *testing.F) {
	msgs := func(ms ...[]byte) []byte {
		var b []byte
		for _, m := range ms {
			b = le.AppendUint16(b, uint16(len(m)))
			b = append(b, m...)
		}
		return b
	}
	f.Add(msgs(appendHello(nil), appendIDs(nil, TypeAck, []uint64{1, 2}), appendIDs(nil, TypeClosed, []uint64{1, 9})))
	f.Add(msgs(appendIDs(nil, TypeReject, []uint64{3, 3, 5}), appendIDs(nil, TypeAck, []uint64{3, 4}), appendIDs(nil, TypeClosed, []uint64{4, 4})))
	f.Add(msgs(appendIDs(nil, TypeClosed, []uint64{1, 2, 3}), appendConns(nil, []entry{{id: 1}})))
	f.Fuzz(func(t *testing.T, in []byte) {
		var parts [][]byte
		for len(in) >= 2 && len(parts) < 64 {
			n := int(le.Uint16(in))
			in = in[2:]
			if n > len(in) {
				n = len(in)
			}
			parts = append(parts, in[:n])
			in = in[n:]
		}
		before := testproc.OpenFDs(t)
		ch, wf, err := NewPair()
		if err != nil {
			t.Fatal(err)
		}
		var conns []Conn
		for id := uint64(1); id <= 4; id++ {
			f, err := os.Open(os.DevNull)
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, fileConn(t, id, 0, f))
		}
		if err := ch.Send(conns...); err != nil {
			t.Fatal(err)
		}
		raw := int(wf.Fd())
		for _, p := range parts {
			if err := unix.Sendmsg(raw, p, nil, nil, unix.MSG_DONTWAIT); err != nil {
				break // a full queue: what was sent is enough
			}
		}
		wf.Close() // end of stream after the messages, and the worker's copies of the conns go

		// The model.
		unacked := map[uint64]bool{1: true, 2: true, 3: true, 4: true}
		open := map[uint64]bool{}
		var ignored uint64
		ch.SetReadDeadline(time.Now().Add(10 * time.Second))
		for {
			ev, err := ch.Recv()
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatal("Recv blocked after the worker closed its end")
				}
				break
			}
			want := 0
			for _, id := range ev.IDs {
				switch ev.Type {
				case TypeAck:
					if unacked[id] {
						delete(unacked, id)
						open[id] = true
						continue
					}
				case TypeClosed:
					if open[id] {
						delete(open, id)
						continue
					}
				case TypeReject:
					if unacked[id] {
						delete(unacked, id)
						continue
					}
				default:
					t.Fatalf("event of type %v with ids %v", ev.Type, ev.IDs)
				}
				want++
			}
			ignored += uint64(want)
			if ev.Ignored != want {
				t.Fatalf("%v %v: Ignored = %d, want %d", ev.Type, ev.IDs, ev.Ignored, want)
			}
			for _, c := range ev.Rejected {
				if !slices.Contains(ev.IDs, c.ID) {
					t.Fatalf("REJECT %v handed back conn %d", ev.IDs, c.ID)
				}
				c.Close()
			}
			if ch.Unacked() != len(unacked) || ch.Open() != len(open) || ch.Ignored() != ignored {
				t.Fatalf("after %v %v: Unacked, Open, Ignored = %d, %d, %d; want %d, %d, %d",
					ev.Type, ev.IDs, ch.Unacked(), ch.Open(), ch.Ignored(), len(unacked), len(open), ignored)
			}
		}
		left, _ := ch.Close()
		if len(left) != len(unacked) {
			t.Fatalf("Close returned %d conns, want %d", len(left), len(unacked))
		}
		for _, c := range left {
			if !unacked[c.ID] {
				t.Fatalf("Close returned conn %d, which was not in flight", c.ID)
			}
			c.Close()
		}
		if after := testproc.OpenFDs(t); after != before {
			t.Fatalf("%d fds before, %d after", before, after)
		}
	})
}
