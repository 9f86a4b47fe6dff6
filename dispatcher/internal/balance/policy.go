package balance

import (
	"math/rand/v2"
	"net/netip"
	"slices"

	"github.com/cohort-dev/cohort/activation/rr"
)

// Policy chooses which worker gets the next connection: the seam for
// balance = "…" and sticky = "…" (issue 19). Pick is given the workers
// that can take a connection now (ready, not full, not being retired),
// never none, in rotation order starting after the worker picked last,
// and key, a hash of the client's address (0 when it is not known: a
// unix socket, or sticky is off), and returns the index in c of its
// choice. It is called with the balancer's lock held, once per
// connection: it must be quick and must not block or keep c. A policy
// with state keeps it in itself, guarded by that lock.
type Policy interface {
	Pick(c []Candidate, key uint64) int
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

// Load is what the worker holds: Unacked + Open.
func (c Candidate) Load() int { return c.Unacked + c.Open() }

// RoundRobin hands connections to the workers in turn.
type RoundRobin struct{}

// Pick takes the next worker in rotation order.
func (RoundRobin) Pick([]Candidate, uint64) int { return 0 }

// LeastConnections hands each connection to the worker holding the fewest
// (unacknowledged plus open); ties go in rotation order.
type LeastConnections struct{}

// Pick takes the worker with the lowest Unacked+Open, the first of equals.
func (LeastConnections) Pick(c []Candidate, _ uint64) int {
	best, bestLoad := 0, c[0].Load()
	for i := 1; i < len(c); i++ {
		if load := c[i].Load(); load < bestLoad {
			best, bestLoad = i, load
		}
	}
	return best
}

// P2C is the power of two choices: two workers drawn at random, the one
// holding fewer connections wins (the first drawn of equals). It reads
// two workers' counts where least-connections reads all, and it does not
// send every connection of a burst to the same least-loaded worker
// before its counts move.
type P2C struct {
	rnd *rand.Rand
}

// NewP2C returns a P2C drawing from its own generator, seeded by seed.
func NewP2C(seed uint64) *P2C {
	return &P2C{rnd: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// Pick draws two distinct candidates and takes the less loaded.
func (p *P2C) Pick(c []Candidate, _ uint64) int {
	if len(c) == 1 {
		return 0
	}
	i := p.rnd.IntN(len(c))
	j := p.rnd.IntN(len(c) - 1)
	if j >= i {
		j++
	}
	if c[j].Load() < c[i].Load() {
		return j
	}
	return i
}

// Weighted is smooth weighted round-robin (nginx's): over any stretch of
// picks each worker gets its share of the weight, interleaved rather than
// in runs. A slot past Weights weighs 1. Only the candidates of a pick
// take part in it, so a full or absent worker's share goes to the others
// meanwhile.
type Weighted struct {
	Weights []int
	current map[int]int // slot → current weight
}

// NewWeighted returns a Weighted over weights (slot order).
func NewWeighted(weights []int) *Weighted {
	return &Weighted{Weights: slices.Clone(weights), current: map[int]int{}}
}

func (p *Weighted) weight(slot int) int {
	if slot < len(p.Weights) && p.Weights[slot] > 0 {
		return p.Weights[slot]
	}
	return 1
}

// Pick adds every candidate's weight to its current weight and takes the
// highest, which then gives back the total.
func (p *Weighted) Pick(c []Candidate, _ uint64) int {
	best, total := 0, 0
	for i, x := range c {
		w := p.weight(x.Slot)
		total += w
		p.current[x.Slot] += w
		if p.current[x.Slot] > p.current[c[best].Slot] {
			best = i
		}
	}
	p.current[c[best].Slot] -= total
	return best
}

// Sticky sends the connections of one client address to one worker
// slot, for as long as the dispatcher runs: across restarts and reloads
// (a new worker of the same slot gets the same clients back).
//
// An address seen for the first time is given a slot by consistent
// hashing with bounded loads: the slots in the address's own rendezvous
// (highest random weight) order, the first that has fewer than
// ⌊addresses/slots⌋+1 addresses, so addresses spread evenly whatever the
// hash does with a few hundred of them; the choice is remembered (up to
// MaxStickyAddresses; past that, new addresses get their first slot in
// rendezvous order, unremembered and unbounded).
//
// At each connection, the address's slot is passed over for the next in
// its rendezvous order when it is not among the candidates (restarting,
// or full: its clients spill over rather than wait, and come back when
// it does) or when it holds more than LoadFactor × the average of open
// connections plus StickySlack (so one hot client cannot melt a worker). Connections
// without a key (unix sockets) go to Fallback.
type Sticky struct {
	LoadFactor float64
	Fallback   Policy

	slotOf  map[uint64]int // address key → slot
	perSlot map[int]int    // slot → addresses given to it
	order   []int          // Pick's scratch
}

// DefaultLoadFactor is Sticky's bound: a slot may hold 25 % more open
// connections than the average before its clients spill over.
const DefaultLoadFactor = 1.25

// StickySlack is added to Sticky's bound, so that a few connections
// that linger (a CLOSED on its way, a client slow to close) do not move
// an address while the app is nearly idle.
const StickySlack = 8

// MaxStickyAddresses bounds Sticky's memory of addresses.
const MaxStickyAddresses = 1 << 16

// Pick takes the address's slot, or the first candidate after it in the
// address's order that is within the load bound.
func (p *Sticky) Pick(c []Candidate, key uint64) int {
	if key == 0 {
		return p.Fallback.Pick(c, key)
	}
	if p.slotOf == nil {
		p.slotOf, p.perSlot = map[uint64]int{}, map[int]int{}
	}
	p.order = p.order[:0]
	for i := range c {
		p.order = append(p.order, i)
	}
	score := func(i int) uint64 { return mix(key ^ mix(uint64(c[i].Slot)+1)) }
	slices.SortFunc(p.order, func(a, b int) int {
		sa, sb := score(a), score(b)
		switch {
		case sa > sb:
			return -1
		case sa < sb:
			return 1
		}
		return 0
	})
	home, known := p.slotOf[key]
	if !known {
		home = c[p.order[0]].Slot
		if len(p.slotOf) < MaxStickyAddresses {
			limit := len(p.slotOf)/len(c) + 1
			for _, i := range p.order {
				if p.perSlot[c[i].Slot] < limit {
					home = c[i].Slot
					break
				}
			}
			p.slotOf[key] = home
			p.perSlot[home]++
		}
	}
	// The home slot first, then the address's order.
	for k, i := range p.order {
		if c[i].Slot == home {
			copy(p.order[1:k+1], p.order[:k])
			p.order[0] = i
			break
		}
	}
	total := 1
	for _, x := range c {
		total += x.Load()
	}
	bound := int(p.LoadFactor*float64(total)/float64(len(c))) + StickySlack
	for _, i := range p.order {
		if c[i].Load() < bound {
			return i
		}
	}
	return p.order[0]
}

// mix is SplitMix64's finaliser: a well-spread 64-bit hash of x.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// IPKey is the sticky key of ip; an IPv4-mapped IPv6 address has its
// IPv4 address's key.
func IPKey(ip netip.Addr) uint64 {
	ip = ip.Unmap()
	if ip.Is4() {
		a := ip.As4()
		return AddrKey(a[:])
	}
	a := ip.As16()
	return AddrKey(a[:])
}

// AddrKey is the sticky key of a client address (its IP bytes; the port
// is left out): never 0.
func AddrKey(ip []byte) uint64 {
	h := uint64(0xcbf29ce484222325) // FNV-1a, then mixed
	for _, b := range ip {
		h ^= uint64(b)
		h *= 0x100000001b3
	}
	if k := mix(h); k != 0 {
		return k
	}
	return 1
}
