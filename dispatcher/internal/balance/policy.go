package balance

import "github.com/cohort-dev/cohort/activation/rr"

// Policy chooses which worker gets the next connection: the seam for
// balance = "…" (issue 19). Pick is given the workers that can take a
// connection now (ready, not full, not being retired), never none, in
// rotation order starting after the worker picked last, and returns the
// index in c of its choice. It is called with the balancer's lock held,
// once per connection: it must be quick and must not block or keep c.
type Policy interface {
	Pick(c []Candidate) int
}

// Candidate is one worker that can take a connection now.
type Candidate struct {
	Slot    int // the worker's index
	Unacked int // connections sent (or being sent) to it, not yet acknowledged

	ch *rr.Channel
}

// Open is how many acknowledged connections the worker has not reported
// closed (meaningful for workers that send CLOSED). It takes the
// channel's lock: policies that do not need it do not pay for it.
func (c Candidate) Open() int { return c.ch.Open() }

// RoundRobin hands connections to the workers in turn.
type RoundRobin struct{}

// Pick takes the next worker in rotation order.
func (RoundRobin) Pick([]Candidate) int { return 0 }

// LeastConnections hands each connection to the worker holding the fewest
// (unacknowledged plus open); ties go in rotation order.
type LeastConnections struct{}

// Pick takes the worker with the lowest Unacked+Open, the first of equals.
func (LeastConnections) Pick(c []Candidate) int {
	best, bestLoad := 0, c[0].Unacked+c[0].Open()
	for i := 1; i < len(c); i++ {
		if load := c[i].Unacked + c[i].Open(); load < bestLoad {
			best, bestLoad = i, load
		}
	}
	return best
}
