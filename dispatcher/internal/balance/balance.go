// Package balance is round-robin mode's balancer: it accepts the
// connections on the app's listeners itself and hands each to a worker
// over that worker's round-robin channel (activation/rr,
// docs/protocol.md). The dispatcher's supervisor drives it through a few
// calls at fixed points of a worker's life and never reaches into its
// state:
//
//	b, err := balance.New(ctx, cfg)          // dups the listeners, starts accepting
//	st, err := b.NewChannel(slot)            // before the fork: st.End goes to fd 3
//	st.Forked(pid)                           // after it (pid 0: the fork failed)
//	b.Ready(pid)                             // state ready: it gets connections
//	b.Drain(pid, retiring)                   // leaving service: nothing new
//	b.Exited(pid)                            // reaped: its channel is taken back
//	<-b.Faults(); b.TakeFaults(serving)      // workers to replace
//	b.Stop(); b.Close()                      // the end
//
// Every method is for the supervisor's loop goroutine; the balancer's own
// goroutines (below) share its state under one mutex.
//
// # Goroutines
//
// All are started by New or Forked and waited for by Close (or end with
// their worker's channel):
//
//   - one event loop per accept thread (Config.AcceptThreads, at least 1;
//     accept.go): an epoll set holding the listeners while some ready
//     worker has room, and the channels of its share of the workers. It
//     accepts (accept4, up to the room) and sends, and it applies HELLO,
//     ACK, CLOSED and REJECT, and retires a channel when it ends (the
//     worker closed it or died, or the dispatcher shut it down), after
//     reading every message the worker sent before. With more than one
//     loop the listeners are in every set with EPOLLEXCLUSIVE: one loop
//     wakes per connection, and the loops accept in parallel;
//   - one writer per worker channel: after a send found the worker's
//     queue full, waits until it has room again;
//   - one flusher: sends held connections when room appears on a call of
//     the supervisor's (Ready, Exited) or a writer's. An event loop sends
//     itself, after an ACK or a rejection, since a send never waits
//     (MSG_DONTWAIT): a worker that is slow to read can never keep the
//     loop from reading acknowledgements;
//   - one that ends the loops when New's ctx ends;
//   - one watcher: takes the channel back from a worker that has left a
//     connection unacknowledged for ack_timeout, and ends a close of the
//     dispatcher's that waits for a lingering connection's client
//     (closeguard.go).
//
// Sends never wait: a worker whose queue is full is skipped until its
// writer sees room, and what did not fit goes to the others. So a worker
// that stops reading cannot stop the event loops, whatever max_pending is.
//
// Connections are "held" only between accept (or a worker's death or
// rejection) and the next free worker; the event loops stop accepting while
// anything is held or no ready worker has room, so the kernel's listen
// backlog holds the rest: nothing is buffered without bound (the
// listeners leave the epoll sets until room appears).
//
// Taking connections back from a worker that still runs (it is too slow,
// or its channel broke) is a Shutdown of the channel: the worker can no
// longer acknowledge, the receiver reads the acknowledgements it sent in
// time, and only the rest goes to other workers, so no connection is
// served twice (the worker library serves nothing it could not
// acknowledge). Such a worker, and one whose channel ends while it should
// be serving, is reported to the supervisor (TakeFaults), which stops it
// and so replaces it; it releases, when it exits, its copies of the
// connections that went to others. A worker that never sends a
// well-formed message gets one connection at a time and, when it fails
// that one or ends, the log says it never spoke the protocol.
//
// # Policies
//
// Balance policies (issue 19: round-robin, least-connections, p2c,
// weighted, sticky) are a [Policy]: it picks, under the balancer's lock,
// one worker among those that can take a connection now, given in
// rotation order with their unacknowledged and open counts, and the
// connection's client key (Config.Sticky: the peer address, read by
// accept4 itself; Config.ProxyProtocol: the PROXY header's, proxy.go).
// Everything else (who is usable, max_pending, hand-backs, the cursor)
// stays here.
//
// Per-worker resource limits (issue 17, cgroups) do not touch the
// balancer: the supervisor places a process in its cgroup at fork time,
// with the fd the balancer hands over (Start.End) as one of its files.
package balance

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// Config is what New needs.
type Config struct {
	// Listeners are the app's listening sockets in [[listen]] order, with
	// Names their names. New accepts on duplicates of them, which it
	// makes non-blocking (O_NONBLOCK is shared with every copy: nobody
	// else accepts on them in this mode); it does not close them.
	Listeners []*os.File
	Names     []string
	// MaxPending is how many connections a worker may have
	// unacknowledged (at least 1).
	MaxPending int
	// MaxHandoffs: a connection handed back more often is closed.
	MaxHandoffs int
	// AckTimeout is how long a worker may leave a connection
	// unacknowledged before its channel is taken back.
	AckTimeout time.Duration
	// Policy picks the worker of each connection; nil is RoundRobin.
	Policy Policy
	// Sticky: read each client's address at accept and pass its
	// AddrKey to the Policy (a Sticky policy uses it).
	Sticky bool
	// ProxyProtocol: take the client's address from the connection's
	// PROXY protocol header instead (peeked, never consumed; proxy.go).
	ProxyProtocol bool
	// AcceptThreads is the number of event loops (at least 1): how many
	// connections can be accepted and handed on at the same time.
	AcceptThreads int
	// AcceptInterval, when above 0, is the least time between two accept
	// rounds of an event loop while connections keep coming: more
	// connections per wake-up, for at most that much delay (run).
	AcceptInterval time.Duration
	// Warnf and Infof log a line each; they must not block for long.
	Warnf, Infof func(format string, args ...any)
}

// Balancer is round-robin mode's state. Fields under mu are shared by the
// event loops, the writers, the flusher, the watcher and the supervisor's
// loop; byPID, silent and stopping belong to the supervisor's loop.
type Balancer struct {
	warnf, infof func(format string, args ...any)
	maxPending   int
	maxHandoffs  int // a connection handed back this often is closed
	ackTimeout   time.Duration
	acceptEvery  time.Duration // Config.AcceptInterval
	policy       Policy
	sticky       bool
	proxy        bool
	env          []string // what workers get besides LISTEN_*: COHORT_RR_LISTENERS, COHORT_RR_HELLO

	ctx       context.Context // cancelled by Close
	cancel    context.CancelFunc
	wg        sync.WaitGroup  // every goroutine of the balancer
	listeners []*os.File      // non-blocking duplicates of the app's listeners, owned here (out of Go's netpoller)
	lfds      []int           // their fds: the tokens 0…len-1 of the epoll sets
	loops     []*loop         // the event loops
	procs     int             // Ps New added to GOMAXPROCS for them; Close gives them back
	accepted  []atomic.Uint64 // connections accepted on listeners[i], by the event loops

	byPID    map[int]*worker // loop only: until reaped and its channel retired
	silent   map[int]bool    // loop only: slots whose last worker never spoke
	stopping bool            // loop only: Stop was called

	faultCh chan struct{} // capacity 1: faults wait for the loop

	mu         sync.Mutex
	workers    []*worker // live channels, in start order
	next       int       // round-robin cursor into workers
	held       []rr.Conn // accepted or returned, not yet sent
	nextID     uint64
	handoffs   map[uint64]int     // times each connection still in flight was handed back
	keys       map[uint64]uint64  // sticky: the client key of each connection in flight
	waiting    map[int32]*waiting // proxy-protocol: connections waiting for their header, by token
	waitTokens int32              // the last token given to a waiting connection (negative)
	faults     []fault            // for the loop
	kick       chan struct{}      // wakes the flusher; buffered, never closed
	byToken    map[int32]*worker  // channels by their token in the epoll sets
	tokens     int32              // the last token given to a channel
	armed      bool               // the listeners are in the epoll sets
	// pausedAccept: accept failed (EMFILE…); re-armed after acceptPause.
	pausedAccept   bool
	acceptFailures int
	closed         bool
	refused        int         // sends refused with ETOOMANYREFS, for the log
	cands          []Candidate // pickLocked's scratch
	candAt         []int       // the index in workers of each of cands
}

// worker is one worker process's channel.
type worker struct {
	ch    *rr.Channel
	pid   int
	index int
	wake  chan struct{} // capacity 1: the writer should wait for room
	done  chan struct{} // closed by retire: the writer ends
	token int32         // in its loop's epoll set
	loop  int           // the index of the loop that reads its channel

	// Under Balancer.mu.
	ready     bool   // the worker is in state ready and the dispatcher not stopping
	gone      bool   // retired: the channel is closed or closing
	revoked   bool   // the channel was shut down: its event loop drains it, then retires it
	revokeWhy string // why, for the loop ("" when the worker was reaped)
	blocked   bool   // its queue was full: skipped until the writer sees room
	pause     bool   // blocked by ETOOMANYREFS: the writer waits a moment instead
	spoke     bool   // it sent a well-formed message
	lazy      bool   // out of its loop's set for reading: the loop reads it on each wake-up (run)
	sending   int    // connections picked for it whose TrySend has not returned
	handed    uint64 // connections sent to it, for status
	ignored   uint64 // ids it sent that the channel did not apply

	// Loop only.
	drained bool // the supervisor took it out of rotation to retire it (reload, restart-worker)
	reaped  bool
	ended   bool // its event loop retired the channel
	spokeOK bool // seen to have spoken (clears its slot's mark in the status line)
	named   bool // logged as never having spoken
}

// fault is something a worker did on its channel that the loop acts on.
type fault struct {
	pid    int
	why    string // "did not acknowledge …", "closed its round-robin channel", …
	ended  bool   // the event loop has retired the channel
	silent bool   // the worker never sent a well-formed message
}

// Fault is a worker that should be serving and failed its channel: the
// supervisor stops it (and so replaces it).
type Fault struct {
	PID    int
	Why    string // for the log and status: "left a connection unacknowledged for ack_timeout (5s)", …
	Silent bool   // it never spoke the protocol: its exit is a failed start
}

// tooManyRefsPause is how long a worker is skipped after sendmsg failed
// with ETOOMANYREFS (too many fds in flight for the dispatcher's
// RLIMIT_NOFILE): acknowledgements have to bring the number down.
const tooManyRefsPause = 10 * time.Millisecond

// New starts balancing: it duplicates cfg.Listeners and starts the
// event loops, the flusher and the watcher, which run until Close (or ctx
// is cancelled). On error nothing is left open or running.
func New(ctx context.Context, cfg Config) (*Balancer, error) {
	ctx, cancel := context.WithCancel(ctx)
	b := &Balancer{
		warnf:       cfg.Warnf,
		infof:       cfg.Infof,
		maxPending:  max(1, cfg.MaxPending),
		maxHandoffs: cfg.MaxHandoffs,
		ackTimeout:  cfg.AckTimeout,
		acceptEvery: cfg.AcceptInterval,
		policy:      cfg.Policy,
		sticky:      cfg.Sticky || cfg.ProxyProtocol,
		proxy:       cfg.ProxyProtocol,
		waiting:     map[int32]*waiting{},
		keys:        map[uint64]uint64{},
		ctx:         ctx,
		cancel:      cancel,
		byPID:       map[int]*worker{},
		silent:      map[int]bool{},
		faultCh:     make(chan struct{}, 1),
		handoffs:    map[uint64]int{},
		kick:        make(chan struct{}, 1),
		byToken:     map[int32]*worker{},
	}
	if b.policy == nil {
		b.policy = RoundRobin{}
	}
	for i, f := range cfg.Listeners {
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			b.Close()
			return nil, fmt.Errorf("listener %s: dup: %w", f.Name(), err)
		}
		// os.NewFile before O_NONBLOCK keeps the copy out of Go's
		// netpoller: only the event loops' epoll sets watch it.
		lf := os.NewFile(uintptr(fd), cfg.Names[i])
		b.listeners = append(b.listeners, lf)
		b.lfds = append(b.lfds, fd)
		if err := unix.SetNonblock(fd, true); err != nil {
			b.Close()
			return nil, fmt.Errorf("listener %s: set non-blocking: %w", f.Name(), err)
		}
	}
	for range max(1, cfg.AcceptThreads) {
		l, err := newLoop()
		if err != nil {
			b.Close()
			return nil, fmt.Errorf("round-robin: %w", err)
		}
		b.loops = append(b.loops, l)
	}
	// Each loop keeps a P while it waits (accept.go): one P more per loop
	// leaves the rest of the process the Ps it had.
	b.procs = len(b.loops)
	runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + b.procs)
	b.accepted = make([]atomic.Uint64, len(b.listeners))
	b.env = []string{rr.ListenersEnv + "=" + strings.Join(cfg.Names, ":"), rr.HelloEnv + "=1"}
	b.wg.Go(b.flusher)
	b.wg.Go(b.watch)
	for i, l := range b.loops {
		b.wg.Go(func() { b.run(i, l) })
	}
	b.wg.Go(func() {
		<-ctx.Done() // New's ctx or Close
		b.closeLoops()
	})
	return b, nil
}

// Accepted is how many connections were accepted on each listener so
// far, in Config.Listeners order. Any goroutine may call it.
func (b *Balancer) Accepted() []uint64 {
	out := make([]uint64, len(b.accepted))
	for i := range b.accepted {
		out[i] = b.accepted[i].Load()
	}
	return out
}

// Env is what a worker's environment needs beyond LISTEN_FDS and
// LISTEN_FDNAMES (rr.FDName): COHORT_RR_LISTENERS and COHORT_RR_HELLO.
func (b *Balancer) Env() []string { return b.env }

// Start is a round-robin channel made for a worker being forked.
type Start struct {
	// End is the worker's end of the channel, for its fd 3. Forked
	// closes it.
	End *os.File
	// EndIno is End's inode (0 when fstat failed), for ready =
	// "listening": the worker waits on it once it serves.
	EndIno uint64

	b     *Balancer
	ch    *rr.Channel
	index int
}

// NewChannel makes the channel of slot's next worker. Its Forked must be
// called once the fork has been tried.
func (b *Balancer) NewChannel(slot int) (*Start, error) {
	ch, end, err := rr.NewPair()
	if err != nil {
		return nil, fmt.Errorf("round-robin channel: %w", err)
	}
	var st unix.Stat_t
	var ino uint64
	if unix.Fstat(int(end.Fd()), &st) == nil {
		ino = st.Ino
	}
	return &Start{End: end, EndIno: ino, b: b, ch: ch, index: slot}, nil
}

// Forked closes the worker's end (the worker has its copy) and, when the
// fork succeeded (pid > 0), starts serving the channel: the balancer keeps
// its end for the worker's life. With pid 0 the channel is closed.
func (s *Start) Forked(pid int) {
	s.End.Close()
	if pid <= 0 {
		s.ch.Close() // nothing was sent on it
		return
	}
	b := s.b
	w := &worker{ch: s.ch, pid: pid, index: s.index, wake: make(chan struct{}, 1), done: make(chan struct{})}
	b.byPID[pid] = w
	b.mu.Lock()
	b.tokens++
	w.token = int32(len(b.lfds)) + b.tokens
	w.loop = int(b.tokens) % len(b.loops)
	b.byToken[w.token] = w
	b.workers = append(b.workers, w)
	var werr error
	if err := s.ch.FD(func(fd int) {
		werr = b.loops[w.loop].ctl(unix.EPOLL_CTL_ADD, fd, w.token, unix.EPOLLIN|unix.EPOLLRDHUP)
	}); err != nil {
		werr = err
	}
	b.mu.Unlock()
	b.wg.Go(func() { b.writer(w) })
	if werr != nil {
		// Unwatched, nothing it sends would be read: its connections
		// would wait for ack_timeout. Take it back at once.
		why := fmt.Sprintf("round-robin channel could not be watched (%v)", werr)
		b.warnf("worker %d (pid %d): %s", w.index, pid, why)
		b.revoke(w, why)
		b.ended(w, net.ErrClosed)
	}
}

// Ready puts pid, now in state ready, into the rotation (unless the
// dispatcher stops).
func (b *Balancer) Ready(pid int) {
	w := b.byPID[pid]
	if w == nil || b.stopping {
		return
	}
	b.mu.Lock()
	changed := !w.ready
	w.ready = true
	if changed {
		b.wakeLocked()
	}
	b.mu.Unlock()
	if changed {
		b.flushLater()
	}
}

// Drain takes pid out of the rotation at once, before it is told to stop:
// nothing new is sent to it; what it has not acknowledged yet stays with
// it until it acknowledges, rejects, or closes its channel, or
// ack_timeout passes (then it goes to another worker). retiring says the
// supervisor retires it (a reload, restart-worker, scale): then its end
// is no failure of its own.
func (b *Balancer) Drain(pid int, retiring bool) {
	w := b.byPID[pid]
	if w == nil {
		return
	}
	if retiring {
		w.drained = true
	}
	b.mu.Lock()
	w.ready = false
	b.mu.Unlock()
}

// Exited shuts the channel of pid, which has been reaped, down: its
// receiver reads what the worker sent last, then hands what it had not
// acknowledged to others.
func (b *Balancer) Exited(pid int) {
	w := b.byPID[pid]
	if w == nil || w.reaped {
		return
	}
	w.reaped = true
	b.mu.Lock()
	changed := w.ready
	w.ready = false
	if changed {
		b.wakeLocked()
	}
	b.mu.Unlock()
	b.revoke(w, "")
	if w.ended {
		delete(b.byPID, pid)
	}
	if changed {
		b.flushLater()
	}
}

// Stop is the dispatcher's stop: no worker gets anything new, and faults
// are no longer reported.
func (b *Balancer) Stop() {
	b.stopping = true
	b.mu.Lock()
	for _, w := range b.workers {
		w.ready = false
	}
	b.mu.Unlock()
}

// Faults is ready when TakeFaults may have something.
func (b *Balancer) Faults() <-chan struct{} { return b.faultCh }

// TakeFaults returns the workers that failed their channels and should
// be stopped: those that left a connection unacknowledged for
// ack_timeout, or whose channel ended or broke, while serving(pid) (the
// supervisor's view: starting or ready). A worker that never said a word
// on its channel is named in the log once, with the remedy, also when it
// exited on its own (the supervisor reaps before it asks). It returns
// nothing once Stop was called.
func (b *Balancer) TakeFaults(serving func(pid int) bool) []Fault {
	b.mu.Lock()
	faults := b.faults
	b.faults = nil
	b.mu.Unlock()
	var out []Fault
	for _, f := range faults {
		w := b.byPID[f.pid]
		if w == nil {
			continue
		}
		if f.ended {
			w.ended = true
		}
		switch {
		case b.stopping:
		case serving(f.pid):
			if f.silent {
				b.neverSpoke(w)
			}
			out = append(out, Fault{PID: f.pid, Why: f.why, Silent: f.silent})
		case w.reaped && f.ended && f.silent && !w.drained:
			b.neverSpoke(w) // it exited without a word
		}
		if w.reaped && w.ended {
			delete(b.byPID, f.pid)
		}
	}
	return out
}

// neverSpoke logs that a worker never spoke the protocol, once per
// worker, and marks its slot for the status line until a worker of the
// slot speaks.
func (b *Balancer) neverSpoke(w *worker) {
	if w.named {
		return
	}
	w.named = true
	b.silent[w.index] = true
	b.warnf("worker %d never spoke the round-robin protocol (docs/protocol.md); for programs without cohort's library use mode = \"shared\" or \"reuseport\"", w.index)
}

// Status is the balancer's part of the STATUS= line for slots 0 to
// slots-1: those whose worker never spoke the protocol. A slot's mark is
// cleared here once a later worker of the slot has spoken (the loop asks
// for the status after every event).
func (b *Balancer) Status(slots int) string {
	b.mu.Lock()
	for _, w := range b.byPID {
		if w.spoke && !w.spokeOK {
			w.spokeOK = true
			delete(b.silent, w.index)
		}
	}
	b.mu.Unlock()
	var silent []string
	for i := range slots {
		if b.silent[i] {
			silent = append(silent, fmt.Sprint(i))
		}
	}
	if len(silent) == 0 {
		return ""
	}
	s := "s"
	if len(silent) == 1 {
		s = ""
	}
	return fmt.Sprintf(" · round-robin protocol never spoken: worker%s %s", s, strings.Join(silent, ","))
}

// Counts is what status shows of the worker pid: how many connections
// were sent to it, and how many of those it holds (not yet acknowledged,
// or acknowledged and not yet closed).
//
// A send in progress counts as handed: the channel counts a connection
// as unacknowledged inside TrySend, before the sender takes the lock to
// add it to handed, and status must never show more open than handed.
func (b *Balancer) Counts(pid int) (handed uint64, active int) {
	w := b.byPID[pid]
	if w == nil {
		return 0, 0
	}
	b.mu.Lock()
	handed = w.handed + uint64(w.sending)
	b.mu.Unlock()
	return handed, w.ch.Unacked() + w.ch.Open()
}

// closeLoops takes the listeners out of the epoll sets (a copy of a
// listener elsewhere would keep its registration alive past its close)
// and closes the sets, which ends the event loops.
func (b *Balancer) closeLoops() {
	b.mu.Lock()
	b.disarmLocked()
	b.closed = true
	b.mu.Unlock()
	for _, l := range b.loops {
		l.stop()
	}
}

// Close ends balancing: the event loops stop, every channel is closed and every
// connection still held is closed (its client sees a reset); it returns
// when every goroutine of the balancer has ended. The supervisor calls it
// once every worker has been reaped. It may be called more than once.
func (b *Balancer) Close() {
	b.cancel()
	b.closeLoops()
	for _, f := range b.listeners {
		f.Close()
	}
	b.mu.Lock()
	b.closed = true
	b.closeWaitingLocked()
	workers, held := b.workers, b.held
	b.workers, b.held = nil, nil
	b.mu.Unlock()
	for _, w := range workers {
		left, _ := w.ch.Close()
		closeConns(left)
	}
	closeConns(held)
	b.wg.Wait()
	b.mu.Lock()
	procs := b.procs
	b.procs = 0
	b.mu.Unlock()
	if procs > 0 {
		runtime.GOMAXPROCS(max(1, runtime.GOMAXPROCS(0)-procs))
	}
}
