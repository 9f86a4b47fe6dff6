package dispatcher

import (
	"cmp"
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/internal/procfs"
	"github.com/cohort-dev/cohort/internal/cgroup"
)

// Recycling ([recycle], issue 17 item 3) replaces a serving worker that
// has grown (memory), aged (max_lifetime) or been handed enough
// connections (max_connections, round-robin mode) the way
// restart-worker does: through reload.go's replacement of one slot, so a
// new worker starts and is ready before the old one is drained with
// stop_signal and stop_timeout. The old worker serves until then; it is
// never killed mid-request except by stop_timeout's SIGKILL.
//
// Recycles run one at a time (a replacement is one slot) and at least
// min_interval apart, so a leak in every worker never takes more than
// one slot out of its steady state: the slots keep N ready workers, and
// at most N+1 processes run. A replacement in progress (reload,
// restart-worker) holds the slots: no recycle starts during one, and a
// reload, restart-worker, scale or stop that arrives during a recycle
// takes over (the recycle's candidate, if not yet in service, is
// stopped; the reload replaces the old worker anyway).
//
// Memory is sampled off the loop by the sampler goroutine, every
// memory_interval, through a memoryReader; the loop gets only its
// decisions (which workers are over) and acts on them when a recycle may
// start. Lifetime and connection limits are drawn for each worker when
// it is forked (limit + a uniform part of the jitter) and checked on the
// loop: lifetimes as deadlines, connection counts (the balancer's,
// through mode.conns) once a second.
//
// A recycle is not a crash: it is counted apart (slot.recycles, shown by
// status) and its log lines say "recycled (memory 512M > 400M)".

// connCheckEvery is how often the loop compares round-robin connection
// counts with max_connections.
const connCheckEvery = time.Second

// memTarget is a worker whose memory the sampler reads.
type memTarget struct {
	pid     int
	started time.Time // with pid, names the process (pids are reused)
	cgroup  string    // its own cgroup's directory; "" when it has none
}

// memSample is what a memoryReader read of one worker.
type memSample struct {
	bytes uint64 // in use: its cgroup's memory.current, or its tree's RSS
	// high counts the times the worker went over memory.high since it
	// started (its cgroup's memory.events "high"; each worker process has
	// a fresh cgroup); 0 where there is no such limit.
	high uint64
	err  error
}

// memoryReader reads the memory of workers, all in one call so that a
// reader that scans /proc does it once. It runs off the loop (in the
// sampler) and must give up when ctx ends. It returns one sample per
// target, in order.
//
// Issue 17's per-worker cgroups plug in here (memory.current and the
// memory.events high counter of each worker's cgroup); until then, and
// wherever the dispatcher has no delegated cgroup subtree, it is
// treeRSS.
type memoryReader func(ctx context.Context, targets []memTarget) []memSample

// treeRSS is the memoryReader without cgroups: each worker's process
// tree's resident memory (procfs.Table.Tree, as status shows it), read
// from one scan of /proc.
func treeRSS(supervisor int) memoryReader {
	return func(ctx context.Context, targets []memTarget) []memSample {
		out := make([]memSample, len(targets))
		pids := make([]int, len(targets))
		for i, t := range targets {
			pids[i] = t.pid
		}
		us, err := treeUsage(ctx, supervisor, pids)
		for i := range out {
			switch {
			case err != nil:
				out[i].err = err
			case us[i].Procs == 0:
				out[i].err = fmt.Errorf("pid %d: gone", targets[i].pid)
			default:
				out[i].bytes = uint64(max(us[i].RSS, 0))
			}
		}
		return out
	}
}

// cgroupMemory is the memoryReader with per-worker cgroups that have the
// memory controller: memory.current (the whole tree, page cache and
// kernel memory included, what memory.max judges) and memory.events'
// high counter, so that crossing memory_high recycles before the kernel
// throttles the worker for long. A target without a cgroup of its own
// (forked before the tree existed, or its cgroup could not be made) is
// read by fallback.
func cgroupMemory(fallback memoryReader) memoryReader {
	return func(ctx context.Context, targets []memTarget) []memSample {
		out := make([]memSample, len(targets))
		var rest []memTarget
		var restAt []int
		for i, t := range targets {
			if t.cgroup == "" {
				rest = append(rest, t)
				restAt = append(restAt, i)
				continue
			}
			n, err := cgroup.MemoryCurrent(t.cgroup)
			if err != nil {
				out[i].err = err
				continue
			}
			ev, err := cgroup.ReadMemoryEvents(t.cgroup)
			if err != nil {
				out[i].err = err
				continue
			}
			out[i].bytes, out[i].high = n, ev.High
		}
		if len(rest) > 0 {
			for j, smp := range fallback(ctx, rest) {
				out[restAt[j]] = smp
			}
		}
		return out
	}
}

// treeUsage reads the usage of the process trees of the workers pids
// (0: none) from one scan of /proc (scanTrees); supervisor is this process, which
// adopts the workers' orphans (usage.go says what a tree is).
func treeUsage(ctx context.Context, supervisor int, pids []int) ([]procfs.Usage, error) {
	t, err := scanTrees(ctx, supervisor) // usage.go
	if err != nil {
		return nil, err
	}
	// Each tree asks for the owner of every child of supervisor that is
	// not in its group: remember the answers, so N workers cost N reads
	// of an environment and not N².
	owners := map[int]int{}
	owner := func(pid int) int {
		if n, ok := owners[pid]; ok {
			return n
		}
		v, _ := procfs.EnvValue(pid, WorkerPIDEnv, maxEnviron)
		n, _ := strconv.Atoi(v)
		owners[pid] = n
		return n
	}
	us := make([]procfs.Usage, len(pids))
	for i, pid := range pids {
		if pid != 0 {
			us[i] = t.Tree(pid, supervisor, owner)
		}
	}
	return us, nil
}

// recycleCause is the sampler's decision about one worker: recycle it,
// for why ("memory 512M > 400M").
type recycleCause struct {
	pid     int
	started time.Time
	why     string
}

// samplerConfig is what the loop publishes for the sampler.
type samplerConfig struct {
	targets   []memTarget
	threshold uint64 // bytes; 0: do not sample
	interval  time.Duration
}

// sampler reads the memory of the ready workers off the loop. The loop
// publishes what to read (publish) and receives the decisions on causes.
type sampler struct {
	read   memoryReader
	causes chan []recycleCause // to the loop; every sample sends one, maybe empty

	mu   sync.Mutex
	cfg  samplerConfig
	poke chan struct{} // the config changed
}

func newSampler(read memoryReader) *sampler {
	return &sampler{read: read, causes: make(chan []recycleCause), poke: make(chan struct{}, 1)}
}

// publish replaces what the sampler reads. Called from the loop; it
// never blocks.
func (s *sampler) publish(cfg samplerConfig) {
	s.mu.Lock()
	s.cfg = cfg
	s.mu.Unlock()
	select {
	case s.poke <- struct{}{}:
	default:
	}
}

// run samples every interval until ctx ends. A new config does not
// restart the interval (targets change at every worker's start and
// exit, which would otherwise put a sample off for as long as workers
// churn).
func (s *sampler) run(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var next time.Time // the next sample; zero while off
	for {
		s.mu.Lock()
		cfg := s.cfg
		s.mu.Unlock()
		wait := time.Hour
		if on := cfg.threshold > 0 && cfg.interval > 0; !on {
			next = time.Time{}
		} else {
			if next.IsZero() {
				next = time.Now().Add(cfg.interval)
			}
			wait = max(time.Until(next), 0)
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return
		case <-s.poke:
			continue
		case <-timer.C:
		}
		if next.IsZero() || time.Now().Before(next) {
			continue
		}
		s.mu.Lock()
		cfg = s.cfg // the latest targets
		s.mu.Unlock()
		next = time.Now().Add(cfg.interval)
		if cfg.threshold == 0 || len(cfg.targets) == 0 {
			continue
		}
		causes := decide(cfg, s.read(ctx, cfg.targets))
		select {
		case s.causes <- causes:
		case <-ctx.Done():
			return
		}
	}
}

// decide turns samples into causes: a worker over the threshold, or
// that went over memory.high.
func decide(cfg samplerConfig, samples []memSample) []recycleCause {
	var out []recycleCause
	for i, m := range samples {
		if i >= len(cfg.targets) || m.err != nil {
			continue
		}
		t := cfg.targets[i]
		switch {
		case m.bytes > cfg.threshold:
			out = append(out, recycleCause{t.pid, t.started, fmt.Sprintf("memory %s > %s", appfile.FormatSize(m.bytes), appfile.FormatSize(cfg.threshold))})
		case m.high > 0:
			out = append(out, recycleCause{t.pid, t.started, fmt.Sprintf("crossing memory.high, %d times", m.high)})
		}
	}
	return out
}

// recycleState is the loop's part of recycling.
type recycleState struct {
	sampler   *sampler // nil until memory is first recycled
	source    string   // what the memory figures are, for the log and status
	published samplerConfig
	over      map[int]recycleCause // the sampler's last decisions, by pid
	nextAt    time.Time            // no recycle starts before (min_interval)
	connAt    time.Time            // next look at connection counts
	total     int                  // recycles done
}

// drawLimits gives a newly forked worker its lifetime and connection
// limits: the policy's, plus a uniform part of its jitter, as gunicorn's
// max_requests_jitter (so that workers started together do not all
// leave together).
func drawLimits(w *worker, r appfile.Recycle, now time.Time) {
	if r.MaxLifetime > 0 {
		w.lifeJitter = 0
		if r.LifetimeJitter > 0 {
			w.lifeJitter = rand.N(r.LifetimeJitter + 1)
		}
		w.recycleAt = now.Add(r.MaxLifetime + w.lifeJitter)
	}
	if r.MaxConnections > 0 {
		w.connJitter = 0
		if r.ConnectionsJitter > 0 {
			w.connJitter = rand.IntN(r.ConnectionsJitter + 1)
		}
		w.maxConns = uint64(r.MaxConnections + w.connJitter)
	}
}

// stepRecycle is called from the loop after every event: it keeps the
// sampler's targets current and starts a recycle when one is due and
// may start, and says whether it did.
func (d *dispatcher) stepRecycle(now time.Time) bool {
	pol := d.app.Recycle
	if pol.Memory > 0 || d.rec.sampler != nil {
		d.publishTargets(pol)
	}
	if !pol.On() || d.stopping || d.draining || !d.sentReady || d.ctl.cur != nil || d.ctl.loading != nil || now.Before(d.rec.nextAt) {
		return false
	}
	w, why := d.dueRecycle(pol, now)
	if w == nil {
		return false
	}
	d.startRecycle(w, why, now)
	return true
}

// publishTargets gives the sampler the ready workers to read when they
// changed, starting it the first time memory is recycled.
func (d *dispatcher) publishTargets(pol appfile.Recycle) {
	// An App built without Parse may leave the interval zero.
	cfg := samplerConfig{threshold: pol.Memory, interval: cmp.Or(pol.MemoryInterval, appfile.DefaultRecycleMemoryInterval)}
	if pol.Memory > 0 {
		for _, s := range d.slots {
			if w := s.cur; w != nil && w.state == stReady {
				cfg.targets = append(cfg.targets, memTarget{w.pid, w.started, w.cgroup})
			}
		}
	}
	p := d.rec.published
	if p.threshold == cfg.threshold && p.interval == cfg.interval && slices.Equal(p.targets, cfg.targets) {
		return
	}
	if d.rec.sampler == nil {
		d.rec.sampler = newSampler(d.readMemory)
		d.wg.Go(func() { d.rec.sampler.run(d.goCtx) })
		d.out.infof("recycle: a worker whose memory exceeds %s is replaced; memory is %s, sampled every %s", appfile.FormatSize(pol.Memory), d.rec.source, cfg.interval)
	}
	d.rec.published = cfg
	d.rec.sampler.publish(cfg)
}

// onRecycleCauses takes the sampler's latest decisions.
func (d *dispatcher) onRecycleCauses(cs []recycleCause) {
	clear(d.rec.over)
	if d.rec.over == nil {
		d.rec.over = map[int]recycleCause{}
	}
	for _, c := range cs {
		d.rec.over[c.pid] = c
	}
}

// samplerCauses is the sampler's channel, nil (never ready) without one.
func (d *dispatcher) samplerCauses() <-chan []recycleCause {
	if d.rec.sampler == nil {
		return nil
	}
	return d.rec.sampler.causes
}

// dueRecycle returns the ready worker to recycle first, and why: memory
// before lifetime before connections, each in slot order.
func (d *dispatcher) dueRecycle(pol appfile.Recycle, now time.Time) (*worker, string) {
	ready := func(w *worker) bool { return w != nil && w.state == stReady && w.unhealthy == "" }
	if pol.Memory > 0 {
		for _, s := range d.slots {
			if w := s.cur; ready(w) {
				if c, ok := d.rec.over[w.pid]; ok && c.started.Equal(w.started) {
					return w, c.why
				}
			}
		}
	}
	if pol.MaxLifetime > 0 {
		for _, s := range d.slots {
			if w := s.cur; ready(w) && !w.recycleAt.IsZero() && !now.Before(w.recycleAt) {
				return w, fmt.Sprintf("lifetime %s: max_lifetime %s + jitter %s", now.Sub(w.started).Round(time.Millisecond), pol.MaxLifetime, w.lifeJitter.Round(time.Millisecond))
			}
		}
	}
	if pol.MaxConnections > 0 && !now.Before(d.rec.connAt) {
		d.rec.connAt = now.Add(connCheckEvery)
		for _, s := range d.slots {
			if w := s.cur; ready(w) && w.maxConns > 0 {
				if handed, _ := d.mode.conns(w.pid); handed >= w.maxConns {
					return w, fmt.Sprintf("%d connections: max_connections %d + jitter %d", handed, pol.MaxConnections, w.connJitter)
				}
			}
		}
	}
	return nil, ""
}

// recycleWake is when the loop must look at the recycle policies again
// without an event: a lifetime's end, the next look at connection
// counts, the end of min_interval. Times already past are left out:
// what then holds a due recycle back (a replacement, the first READY=1)
// ends with an event of its own.
func (d *dispatcher) recycleWake(now time.Time) time.Time {
	pol := d.app.Recycle
	if !pol.On() || d.stopping || d.draining {
		return time.Time{}
	}
	var next time.Time
	consider := func(t time.Time) {
		if t.After(now) && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	consider(d.rec.nextAt)
	if pol.MaxConnections > 0 {
		consider(d.rec.connAt)
		if !d.rec.connAt.After(now) {
			consider(now.Add(connCheckEvery))
		}
	}
	for _, s := range d.slots {
		if w := s.cur; w != nil && w.state == stReady {
			consider(w.recycleAt)
		}
	}
	return next
}

// startRecycle begins the replacement of w's slot for why.
func (d *dispatcher) startRecycle(w *worker, why string, now time.Time) {
	s := w.slot
	r := d.newReplacement(kindRecycle, fmt.Sprintf("recycle of worker %d (%s)", s.index, why), []*slot{s}, now)
	r.cause = why
	d.ctl.cur = r
	delete(d.rec.over, w.pid)
	d.out.infof("worker %d (pid %d) recycled (%s): starting its replacement; it serves until that one is ready", s.index, w.pid, why)
	d.observe(Event{Kind: WorkerRecycled, Worker: s.index, PID: w.pid, Gen: w.gen, Reason: why})
	d.stepReplace(now)
}

// yieldRecycle gives up a running recycle for what needs the slots now
// (a reload, restart-worker, scale, the stop): a candidate not in
// service yet is stopped and the old worker stays; a swap already made
// stands.
func (d *dispatcher) yieldRecycle(to string, now time.Time) {
	r := d.ctl.cur
	if r == nil || r.kind != kindRecycle {
		return
	}
	d.ctl.cur = nil
	for s, w := range r.batch {
		if s.cur != w && w.state != stExited {
			d.out.infof("%s given up for %s: its candidate (pid %d) is stopped and worker %d (pid %d) keeps serving", r.why, to, w.pid, s.index, s.cur.pidOr0())
			d.retire(w, nil)
		}
	}
	d.rec.nextAt = now.Add(d.app.Recycle.MinInterval)
}

// pidOr0 is w's pid, 0 for no worker.
func (w *worker) pidOr0() int {
	if w == nil {
		return 0
	}
	return w.pid
}
