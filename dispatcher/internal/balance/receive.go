package balance

// Receiving: a worker's acknowledgements, rejections and the end of its
// channel; the watcher and revoke take a channel back.

import (
	"errors"
	"fmt"
	"math/bits"
	"net"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// watch takes the channel back from every worker that has left a
// connection unacknowledged for ack_timeout, and reports it to the loop;
// it also runs the close guard (closeguard.go).
func (b *Balancer) watch() {
	every := min(max(b.ackTimeout/4, 10*time.Millisecond), time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	guard := newCloseGuard(every, b.loops, b.warnf) // closeguard.go
	for {
		select {
		case <-t.C:
		case <-b.ctx.Done():
			return
		}
		for _, w := range guard.tick() {
			// Only a worker makes a close wait (it set SO_LINGER again
			// after the dispatcher turned it off): it could stop the
			// loop once per connection it is given, so it gets no
			// other.
			why := "made the dispatcher's close of one of its connections wait for the client (SO_LINGER set again after the dispatcher turned it off)"
			if b.revoke(w, why) {
				b.fault(fault{pid: w.pid, why: why})
			}
		}
		now := time.Now()
		if b.proxy {
			b.expireHeaders(now)
		}
		var late []*worker
		var silent []bool
		b.mu.Lock()
		for _, w := range b.workers {
			if w.gone || w.revoked {
				continue
			}
			if at := w.ch.Oldest(); !at.IsZero() && now.Sub(at) >= b.ackTimeout {
				late = append(late, w)
				silent = append(silent, !w.spoke)
			}
		}
		b.mu.Unlock()
		for i, w := range late {
			why := fmt.Sprintf("left a connection unacknowledged for ack_timeout (%s)", b.ackTimeout)
			if b.revoke(w, why) {
				b.fault(fault{pid: w.pid, why: why, silent: silent[i]})
			}
		}
	}
}

// revoke shuts w's channel down, once: nothing more is sent to it, its
// receiver reads what it sent before and then retires the channel,
// handing the rest to other workers. why is passed on to the loop when
// the channel has ended. It reports whether this call shut it down.
func (b *Balancer) revoke(w *worker, why string) bool {
	b.mu.Lock()
	if w.revoked || w.gone {
		b.mu.Unlock()
		return false
	}
	w.revoked, w.revokeWhy = true, why
	b.mu.Unlock()
	if err := w.ch.Shutdown(); err != nil {
		b.warnf("worker %d (pid %d): %v", w.index, w.pid, err)
	}
	return true
}

// fault hands f to the loop without waiting for it.
func (b *Balancer) fault(f fault) {
	b.mu.Lock()
	b.faults = append(b.faults, f)
	b.mu.Unlock()
	select {
	case b.faultCh <- struct{}{}:
	default:
	}
}

// drain reads what w sent, without waiting, and applies it; when the
// channel has ended it retires w and tells the supervisor's loop. It
// reports whether it read anything, and whether connections are held
// that a flush should send now (a rejection, or a worker's first word,
// which raises its limit). Only the event loop holding w's channel calls
// it.
func (b *Balancer) drain(w *worker) (got, flush bool) {
	for i := 0; i < maxRecvPerEvent || w.ch.Buffered() > 0; i++ {
		ev, err := w.ch.TryRecv()
		if errors.Is(err, rr.ErrWouldBlock) {
			return got, flush
		}
		got = true
		if err != nil {
			b.ended(w, err)
			return got, false
		}
		if b.apply(w, ev) {
			flush = true
		}
	}
	return got, flush
}

// drainOn is drain(w) run by loop l, which tells the close guard whose
// channel it is reading.
func (b *Balancer) drainOn(l *loop, w *worker) (got, flush bool) {
	l.drains.Add(1)
	l.draining.Store(w)
	defer l.draining.Store(nil)
	return b.drain(w)
}

// ended retires w, whose channel ended with err, and tells the loop.
func (b *Balancer) ended(w *worker, err error) {
	b.mu.Lock()
	closing := b.closed
	revoked, why, spoke := w.revoked, w.revokeWhy, w.spoke
	b.mu.Unlock()
	if !revoked {
		why = "closed its round-robin channel"
		if !errors.Is(err, net.ErrClosed) {
			why = fmt.Sprintf("broke its round-robin channel (%v)", err)
		}
	}
	b.retire(w)
	if !closing {
		b.fault(fault{pid: w.pid, why: why, ended: true, silent: !spoke})
	}
}

// apply takes one message of w into account; it reports whether a flush
// should follow.
func (b *Balancer) apply(w *worker, ev rr.Event) bool {
	var drop []rr.Conn
	b.mu.Lock()
	first := !w.spoke
	w.spoke = true
	prevIgnored := w.ignored
	w.ignored += uint64(ev.Ignored)
	ignored := w.ignored
	switch ev.Type {
	case rr.TypeReject:
		drop = b.requeueLocked(ev.Rejected, true)
	case rr.TypeAck:
		if len(b.handoffs) > 0 || len(b.keys) > 0 {
			for _, id := range ev.IDs {
				delete(b.handoffs, id)
				delete(b.keys, id)
			}
		}
	}
	held := len(b.held) > 0
	if first || ev.Type == rr.TypeReject || ev.Type == rr.TypeAck {
		b.wakeLocked() // room: its limit grew from 1 to max_pending, or it took or gave back some
	}
	b.mu.Unlock()
	closeConns(drop)
	if bits.Len64(ignored) != bits.Len64(prevIgnored) { // past 1, 2, 4, 8…: log without flooding
		b.warnf("worker %d (pid %d) sent %v for %d ids it does not hold; ignored (%d so far)", w.index, w.pid, ev.Type, ev.Ignored, ignored)
	}
	return held
}

// retire stops using w's channel and hands every connection it had not
// acknowledged to other workers. It may be called more than once.
func (b *Balancer) retire(w *worker) {
	b.mu.Lock()
	if !w.gone {
		w.gone = true
		close(w.done)
		delete(b.byToken, w.token)
		w.ch.FD(func(fd int) { b.loops[w.loop].ctl(unix.EPOLL_CTL_DEL, fd, 0, 0) })
		for i, x := range b.workers {
			if x == w {
				b.workers = append(b.workers[:i], b.workers[i+1:]...)
				if b.next > i {
					b.next--
				}
				break
			}
		}
		if len(b.workers) > 0 {
			b.next %= len(b.workers)
		} else {
			b.next = 0
		}
	}
	closing := b.closed
	b.mu.Unlock()
	left, _ := w.ch.Close()
	if len(left) > 0 && !closing {
		b.infof("worker %d (pid %d): %d connections it had not acknowledged go to other workers", w.index, w.pid, len(left))
	}
	b.requeue(left)
}

func closeConns(conns []rr.Conn) {
	for _, c := range conns {
		c.Close()
	}
}
