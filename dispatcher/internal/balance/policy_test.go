package balance

import (
	"testing"

	"github.com/cohort-dev/cohort/activation/rr"
)

// TestPolicies: round-robin takes the next worker in rotation order;
// least-connections the one holding fewest, the first of equals (so that
// ties still rotate).
func TestPolicies(t *testing.T) {
	cands := make([]Candidate, 3)
	for i := range cands {
		ch, end, err := rr.NewPair()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ch.Close(); end.Close() })
		cands[i] = Candidate{Slot: i, ch: ch}
	}
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
		if got := (RoundRobin{}).Pick(cands); got != tc.rr {
			t.Errorf("RoundRobin.Pick(unacked %v) = %d, want %d", tc.unacked, got, tc.rr)
		}
		if got := (LeastConnections{}).Pick(cands); got != tc.lc {
			t.Errorf("LeastConnections.Pick(unacked %v) = %d, want %d", tc.unacked, got, tc.lc)
		}
	}
}
