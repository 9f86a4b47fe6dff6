package balance

// Sending: held connections go to the worker the policy picks, without
// ever waiting for one; a full worker is skipped until its writer sees
// room.

import (
	"errors"
	"fmt"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// requeue takes back connections a worker did not take (it rejected them,
// died, closed its channel or was too slow) and sends them to other
// workers, before anything accepted later.
func (b *Balancer) requeue(conns []rr.Conn) {
	if len(conns) == 0 {
		return
	}
	b.mu.Lock()
	drop := b.requeueLocked(conns, true)
	b.mu.Unlock()
	closeConns(drop)
	b.flushLater()
}

// requeueLocked puts conns at the head of what is held. A connection that
// a worker had been given (handedBack) and that comes back more than
// maxHandoffs times is dropped: no worker takes it, or it kills the ones
// that do. The caller closes what it returns once it has released b.mu:
// a close can wait (closeguard.go), and nothing may wait holding the
// lock that the watcher, which ends such waits, takes.
func (b *Balancer) requeueLocked(conns []rr.Conn, handedBack bool) (drop []rr.Conn) {
	if b.closed {
		return conns
	}
	keep := make([]rr.Conn, 0, len(conns)+len(b.held))
	for _, c := range conns {
		if handedBack {
			b.handoffs[c.ID]++
			if b.handoffs[c.ID] > b.maxHandoffs {
				delete(b.handoffs, c.ID)
				delete(b.keys, c.ID)
				b.warnf("connection %d came back from a worker %d times (rejected, not acknowledged, or its worker died; does any worker serve listener %d?); closed it", c.ID, b.maxHandoffs+1, c.Listener)
				drop = append(drop, c)
				continue
			}
		}
		keep = append(keep, c)
	}
	b.held = append(keep, b.held...)
	return drop
}

// flushLater has the flusher goroutine send what is held.
func (b *Balancer) flushLater() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// flusher runs flush whenever kicked, until round-robin mode ends.
func (b *Balancer) flusher() {
	for {
		select {
		case <-b.kick:
			b.flush()
		case <-b.ctx.Done():
			return
		}
	}
}

// flush sends held connections to workers with room until nothing is held
// or no worker has room. It never waits for a worker: what does not fit
// in a worker's queue goes back to the head of what is held, and that
// worker is skipped until its writer sees room.
func (b *Balancer) flush() {
	type batch struct {
		w     *worker
		conns []rr.Conn
	}
	for {
		var plan []batch
		b.mu.Lock()
		for len(b.held) > 0 && !b.closed {
			w := b.pickLocked(b.keys[b.held[0].ID])
			if w == nil {
				break
			}
			c := b.held[0]
			b.held[0] = rr.Conn{}
			b.held = b.held[1:]
			w.sending++
			i := 0
			for i < len(plan) && plan[i].w != w {
				i++
			}
			if i == len(plan) {
				plan = append(plan, batch{w: w})
			}
			plan[i].conns = append(plan[i].conns, c)
		}
		b.mu.Unlock()
		if len(plan) == 0 {
			return
		}
		for _, bt := range plan {
			n, err := bt.w.ch.TrySend(bt.conns...)
			broken, refused := false, 0
			var drop []rr.Conn
			b.mu.Lock()
			bt.w.sending -= len(bt.conns)
			bt.w.handed += uint64(n)
			if err != nil {
				switch {
				case errors.Is(err, rr.ErrWouldBlock), errors.Is(err, unix.ETOOMANYREFS):
					bt.w.blocked = true
					bt.w.pause = errors.Is(err, unix.ETOOMANYREFS)
					if bt.w.pause {
						b.refused++
						refused = b.refused
					}
					select {
					case bt.w.wake <- struct{}{}:
					default:
					}
				case errors.Is(err, rr.ErrNotSent):
					// Retired or shut down meanwhile.
				default:
					broken = true
				}
				// They never reached the worker: no handoff.
				drop = b.requeueLocked(bt.conns[n:], false)
			}
			b.mu.Unlock()
			closeConns(drop)
			if refused&(refused-1) == 0 && refused > 0 {
				b.warnf("round-robin: sending to worker %d: %v (%d times so far; raise LimitNOFILE= or lower max_pending)", bt.w.index, err, refused)
			}
			if broken {
				b.revoke(bt.w, fmt.Sprintf("broke its round-robin channel (%v)", err))
			}
		}
	}
}

// pickLocked chooses the worker for the next connection, or nil when no
// ready worker has room: the policy picks among the usable workers with
// room, in rotation order from the cursor, and the cursor moves past the
// one it picked.
func (b *Balancer) pickLocked(key uint64) *worker {
	n := len(b.workers)
	b.cands, b.candAt = b.cands[:0], b.candAt[:0]
	for i := range n {
		at := (b.next + i) % n
		w := b.workers[at]
		if !b.usableLocked(w) {
			continue
		}
		unacked := b.loadLocked(w)
		if unacked >= b.limitLocked(w) {
			continue
		}
		b.cands = append(b.cands, Candidate{Slot: w.index, Unacked: unacked, ch: w.ch})
		b.candAt = append(b.candAt, at)
	}
	if len(b.cands) == 0 {
		return nil
	}
	k := b.policy.Pick(b.cands, key)
	if k < 0 || k >= len(b.cands) {
		k = 0 // a policy's bug must not stall the balancer
	}
	at := b.candAt[k]
	clear(b.cands) // drop the channels
	b.next = (at + 1) % n
	return b.workers[at]
}

// writer waits, each time a send found w's queue full, until it has room
// again, then puts w back into the rotation.
func (b *Balancer) writer(w *worker) {
	for {
		select {
		case <-w.wake:
		case <-w.done:
			return
		case <-b.ctx.Done():
			return
		}
		b.mu.Lock()
		pause := w.pause
		b.mu.Unlock()
		var err error
		if pause {
			t := time.NewTimer(tooManyRefsPause)
			select {
			case <-t.C:
			case <-w.done:
				t.Stop()
				return
			case <-b.ctx.Done():
				t.Stop()
				return
			}
		} else {
			err = w.ch.WaitWritable() // returns when the channel is shut down or closed, too
		}
		b.mu.Lock()
		w.blocked, w.pause = false, false
		b.wakeLocked()
		b.mu.Unlock()
		b.flushLater()
		if err != nil {
			return
		}
	}
}
