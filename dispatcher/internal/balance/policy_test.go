package balance

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/cohort-dev/cohort/activation/rr"
)

// candidates makes n candidates with real channels (Open reads them).
func candidates(t *testing.T, n int) []Candidate {
	t.Helper()
	cands := make([]Candidate, n)
	for i := range cands {
		ch, end, err := rr.NewPair()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ch.Close(); end.Close() })
		cands[i] = Candidate{Slot: i, ch: ch}
	}
	return cands
}

// TestPolicies: round-robin takes the next worker in rotation order;
// least-connections the one holding fewest, the first of equals (so that
// ties still rotate).
func TestPolicies(t *testing.T) {
	cands := candidates(t, 3)
	for _, tc := range []struct {
		unacked []int
		rr, lc  int
	}{
		{[]int{0, 0, 0}, 0, 0},
		{[]int{2, 1, 1}, 0, 1},
		{[]int{3, 2, 0}, 0, 2},
	} {
		for i, n := range tc.unacked {
			cands[i].Unacked = n
		}
		if got := (RoundRobin{}).Pick(cands, 0); got != tc.rr {
			t.Errorf("RoundRobin.Pick(unacked %v) = %d, want %d", tc.unacked, got, tc.rr)
		}
		if got := (LeastConnections{}).Pick(cands, 0); got != tc.lc {
			t.Errorf("LeastConnections.Pick(unacked %v) = %d, want %d", tc.unacked, got, tc.lc)
		}
	}
}

// TestP2C: of two drawn workers the less loaded wins, so the most loaded
// of three is never picked, and the least loaded is picked about two
// times in three; with one candidate there is no draw.
func TestP2C(t *testing.T) {
	cands := candidates(t, 3)
	cands[0].Unacked, cands[1].Unacked, cands[2].Unacked = 5, 1, 3
	p := NewP2C(1)
	var got [3]int
	const n = 3000
	for range n {
		got[p.Pick(cands, 0)]++
	}
	if got[0] != 0 {
		t.Errorf("the most loaded worker was picked %d times of %d", got[0], n)
	}
	if frac := float64(got[1]) / n; frac < 0.6 || frac > 0.73 {
		t.Errorf("the least loaded worker got %.2f of the picks, want about 2/3 (%v)", frac, got)
	}
	if k := p.Pick(cands[:1], 0); k != 0 {
		t.Errorf("one candidate: Pick = %d", k)
	}
}

// TestWeighted: weights [2, 1, 1] give 2:1:1 over every 4 picks,
// interleaved (nginx's smooth sequence a b a c), and a slot missing
// from the candidates leaves its share to the others.
func TestWeighted(t *testing.T) {
	cands := candidates(t, 3)
	p := NewWeighted([]int{2, 1, 1})
	var seq []int
	for range 8 {
		seq = append(seq, cands[p.Pick(cands, 0)].Slot)
	}
	if got, want := fmt.Sprint(seq), "[0 1 2 0 0 1 2 0]"; got != want {
		t.Errorf("picks %s, want %s", got, want)
	}
	two := []Candidate{cands[1], cands[2]}
	var got [3]int
	for range 10 {
		got[two[p.Pick(two, 0)].Slot]++
	}
	if got[1] != 5 || got[2] != 5 {
		t.Errorf("slot 0 away: picks %v, want 5 and 5 for slots 1 and 2", got)
	}
}

// TestSticky: one address always gets the same slot while loads are
// even; 256 addresses spread over 2 and over 4 slots within 1.2; a slot
// that leaves moves only its own addresses, and they come back with it;
// a slot above the load bound is passed over; no key is the fallback's.
func TestSticky(t *testing.T) {
	cands := candidates(t, 4)
	p := &Sticky{LoadFactor: DefaultLoadFactor, Fallback: RoundRobin{}}
	keys := make([]uint64, 256)
	for i := range keys {
		keys[i] = IPKey(netip.AddrFrom4([4]byte{127, 0, byte(i / 250), byte(2 + i%250)}))
	}
	for _, n := range []int{2, 4} {
		p := &Sticky{LoadFactor: DefaultLoadFactor, Fallback: RoundRobin{}}
		count := map[int]int{}
		for _, k := range keys {
			first := cands[p.Pick(cands[:n], k)].Slot
			for range 3 {
				if again := cands[p.Pick(cands[:n], k)].Slot; again != first {
					t.Fatalf("%d slots: key %x went to slot %d, then %d", n, k, first, again)
				}
			}
			count[first]++
		}
		lo, hi := len(keys), 0
		for s := range n {
			lo, hi = min(lo, count[s]), max(hi, count[s])
		}
		if lo == 0 || float64(hi)/float64(lo) > 1.2 {
			t.Errorf("%d slots: 256 addresses spread %v (max/min %.2f), want within 1.2", n, count, float64(hi)/float64(lo))
		}
	}
	// Slot 3 leaves: its addresses move, the others stay.
	for _, k := range keys {
		before := cands[p.Pick(cands, k)].Slot
		after := cands[p.Pick(cands[:3], k)].Slot
		back := cands[p.Pick(cands, k)].Slot
		if before != 3 && after != before || back != before {
			t.Errorf("key %x: slot %d, %d while slot 3 was away, then %d", k, before, after, back)
		}
	}
	// A loaded slot is passed over.
	k := keys[0]
	home := p.Pick(cands, k)
	cands[home].Unacked = 20
	if got := p.Pick(cands, k); got == home {
		t.Errorf("slot %d holds 20 of 20 connections and still got the address", home)
	}
	cands[home].Unacked = 0
	if got := p.Pick(cands, 0); got != 0 {
		t.Errorf("no key: Pick = %d, want the fallback's 0", got)
	}
}
