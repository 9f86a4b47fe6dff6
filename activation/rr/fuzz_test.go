package rr

import (
	"bytes"
	"testing"
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
