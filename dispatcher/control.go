package dispatcher

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/dispatcher/internal/sockdiag"
)

// The control socket: $RUNTIME_DIRECTORY/control.sock (or the private
// runtime directory of `cohort run`, logged at start). Its server runs in
// a goroutine of Run; each request becomes a ctlRequest that the loop
// carries out, so the dispatcher's state has one owner.

// ctlRequest is one control request handed to the loop.
type ctlRequest struct {
	cmd   string
	n     int            // scale: workers; restart-worker, signal: index (signal: -1 for all)
	sig   syscall.Signal // signal
	reply func(ctlReply) // called once, from the loop; never blocks
}

// ctlReply is the loop's answer.
type ctlReply struct {
	err    error
	status *statusSnapshot
	pids   []int // signal: the processes signalled
}

// statusSnapshot is the loop's view for a status request; the handler
// adds what it reads from /proc, outside the loop.
type statusSnapshot struct {
	st    control.Status
	procs []int             // pid of st.Workers[i], 0 for none
	socks []sockdiag.Socket // st.Listeners[i]'s socket, for its queue
	known []bool            // whether socks[i] could be identified
}

// serveControl creates the control socket in dir and serves it until ctx
// is done. A socket that cannot be created is logged, not fatal: the
// workers serve without it (but reloads through ExecReload= then fail).
func (d *dispatcher) serveControl(ctx context.Context, dir string) {
	path := filepath.Join(dir, control.SocketName)
	// Supervisor (this process) is the root of the worker trees, whose
	// processes get read-only commands only. With Options.Subreaper (cohort
	// dispatch and cohort run set it) a worker's detached daemons are
	// re-parented here and stay in those trees.
	srv, err := control.Listen(path, &control.Config{Supervisor: os.Getpid(), Logf: d.out.warnf})
	if err != nil {
		d.out.warnf("control socket %s: %v; 'cohort status', 'cohort scale' and reloads through it will not work", path, err)
		return
	}
	d.ctl.socketPath = path
	if d.tempDir != "" {
		d.out.infof("control socket: %s (cohort status --socket %s)", path, path)
	}
	h := &ctlHandler{reqs: d.ctl.reqs, supervisor: os.Getpid()}
	d.wg.Go(func() {
		defer srv.Close()
		if err := srv.Serve(ctx, h); err != nil {
			d.out.warnf("control socket: %v", err)
		}
	})
}

// ctlHandler implements control.Handler by asking the loop. What it
// reads from /proc it reads in the connection's goroutine, never in the
// loop.
type ctlHandler struct {
	reqs       chan<- ctlRequest
	supervisor int // this process: the subreaper that adopts workers' orphans

	mu   sync.Mutex
	last map[workerKey]cpuSample // each worker's last CPU sample (usage.go)
}

var _ control.Handler = (*ctlHandler)(nil)

// errGone is returned when the dispatcher stopped before answering.
var errGone = errors.New("the dispatcher is stopping")

func (h *ctlHandler) ask(ctx context.Context, cmd string, n int) (ctlReply, error) {
	return h.askReq(ctx, ctlRequest{cmd: cmd, n: n})
}

func (h *ctlHandler) askReq(ctx context.Context, req ctlRequest) (ctlReply, error) {
	replies := make(chan ctlReply, 1) // buffered: the loop never waits for this handler
	req.reply = func(r ctlReply) { replies <- r }
	select {
	case h.reqs <- req:
	case <-ctx.Done():
		return ctlReply{}, errGone
	}
	select {
	case rep := <-replies:
		return rep, rep.err
	case <-ctx.Done():
		return ctlReply{}, errGone
	}
}

// Status returns the dispatcher's view of every worker, with the memory
// and recent CPU use of each worker's process tree read from /proc
// (usage.go).
func (h *ctlHandler) Status(ctx context.Context) (*control.Status, error) {
	rep, err := h.ask(ctx, control.CmdStatus, 0)
	if err != nil {
		return nil, err
	}
	snap := rep.status
	h.usage(ctx, snap)
	queues(ctx, snap)
	return &snap.st, nil
}

// Reload runs a rolling reload and returns when it has finished.
func (h *ctlHandler) Reload(ctx context.Context) error {
	_, err := h.ask(ctx, control.CmdReload, 0)
	return err
}

// Scale changes the number of workers.
func (h *ctlHandler) Scale(ctx context.Context, workers int) error {
	_, err := h.ask(ctx, control.CmdScale, workers)
	return err
}

// RestartWorker gracefully replaces one worker and returns when the new
// one serves and the old one has ended.
func (h *ctlHandler) RestartWorker(ctx context.Context, index int) error {
	_, err := h.ask(ctx, control.CmdRestartWorker, index)
	return err
}

// Signal sends sig to the workers' main processes (of slot *worker only,
// when given); the loop sends it, as it owns which pids are still its
// children (a reaped worker's pid may belong to someone else by now).
func (h *ctlHandler) Signal(ctx context.Context, sig syscall.Signal, worker *int) ([]int, error) {
	n := -1
	if worker != nil {
		n = *worker
	}
	rep, err := h.askReq(ctx, ctlRequest{cmd: control.CmdSignal, n: n, sig: sig})
	return rep.pids, err
}

// signal is a signal request in the loop: sig to the main process of
// every live worker (the current ones, and candidates and retiring ones
// during a replacement) of slot index, or of all slots for -1. Never the
// dispatcher, never a worker's other processes: like Node's
// worker.process.kill and PM2's sendSignal, the program decides what its
// children get.
func (d *dispatcher) signal(index int, sig syscall.Signal) ([]int, error) {
	if index >= len(d.slots) {
		return nil, fmt.Errorf("signal: no worker %d (there are %d, 0 to %d)", index, len(d.slots), len(d.slots)-1)
	}
	var ws []*worker
	for _, w := range d.procs {
		if w.state != stExited && (index < 0 || w.slot.index == index) {
			ws = append(ws, w)
		}
	}
	sort.Slice(ws, func(a, b int) bool {
		if ws[a].slot.index != ws[b].slot.index {
			return ws[a].slot.index < ws[b].slot.index
		}
		return ws[a].gen < ws[b].gen
	})
	var pids []int
	for _, w := range ws {
		if err := unix.Kill(w.pid, sig); err != nil {
			d.out.warnf("signal %s to worker %d (pid %d): %v", unix.SignalName(sig), w.slot.index, w.pid, err)
			continue
		}
		pids = append(pids, w.pid)
		d.out.infof("sent %s to worker %d (pid %d) (control socket)", unix.SignalName(sig), w.slot.index, w.pid)
	}
	if len(pids) == 0 {
		return nil, errors.New("signal: no worker process is running to receive it")
	}
	return pids, nil
}

// onControl carries out a control request in the loop.
func (d *dispatcher) onControl(req ctlRequest, now time.Time) {
	done := func(err error) { req.reply(ctlReply{err: err}) }
	switch req.cmd {
	case control.CmdStatus:
		req.reply(ctlReply{status: d.snapshot(now)})
	case control.CmdReload:
		d.startReload("control socket", now, done)
	case control.CmdScale:
		done(d.scale(req.n, now))
	case control.CmdRestartWorker:
		d.startRestartWorker(req.n, now, done)
	case control.CmdSignal:
		pids, err := d.signal(req.n, req.sig)
		req.reply(ctlReply{err: err, pids: pids})
	default:
		done(fmt.Errorf("unknown command %q", req.cmd))
	}
}

// snapshot describes every slot's current worker and, during a
// replacement, the candidates and retiring workers too (same index, their
// own generation), sorted by index.
func (d *dispatcher) snapshot(now time.Time) *statusSnapshot {
	st := control.Status{
		App:         d.app.Name,
		Mode:        string(d.app.Mode),
		Generation:  d.gen,
		Line:        d.statusLine(now),
		Since:       d.started,
		PID:         os.Getpid(),
		ConfigError: d.fileProblem,
		CPUs:        control.CPUs{Count: d.limit.Count(), How: d.limit.String(), WorkersAuto: d.app.Workers.Auto},
		Recycles:    d.rec.total,
	}
	if d.app.Recycle.Memory > 0 {
		st.RecycleMemory = fmt.Sprintf("over %s, %s", appfile.FormatSize(d.app.Recycle.Memory), d.rec.source)
	}
	st.ReadyWorkers = d.readyCount()
	st.MinReady = d.app.Metrics.ReadyNeeded(len(d.slots))
	st.Serving = !d.stopping && !d.draining && st.ReadyWorkers >= st.MinReady
	st.Live = d.live(now)
	st.Reloads = d.ctl.reloads
	acc := d.mode.accepted()
	for _, l := range d.socks {
		cl := control.Listener{Name: l.name, Worker: l.worker, Queue: -1, QueueLimit: -1}
		if l.index < len(acc) {
			cl.Accepted = acc[l.index]
		}
		st.Listeners = append(st.Listeners, cl)
	}
	switch {
	case d.stopping:
		st.State = "stopping"
	case d.draining:
		st.State = "draining"
	case d.ctl.cur != nil && d.ctl.cur.kind == kindReload:
		st.State = "reloading"
	case !d.sentReady:
		st.State = "starting"
	default:
		st.State = "ready"
	}
	snap := &statusSnapshot{}
	for _, l := range d.socks {
		snap.socks, snap.known = append(snap.socks, l.id), append(snap.known, l.known)
	}
	add := func(s *slot, w *worker) {
		// A slot in backoff shows its last process's generation (the
		// current one when it never had a process).
		cw := control.Worker{Index: s.index, Restarts: s.restarts, Recycles: s.recycles, LastRecycle: s.lastRecycle, State: "backoff", Generation: cmp.Or(s.gen, d.gen)}
		if len(s.causes) > 0 {
			cw.RestartCauses = maps.Clone(s.causes) // the handler reads it off the loop
		}
		pid := 0
		if w != nil {
			cw.PID, cw.Generation, cw.State, cw.Started, cw.Status = w.pid, w.gen, w.state.String(), w.started, w.status
			if w.unhealthy != "" && w.state != stExited {
				cw.State, cw.Status = "unhealthy", w.unhealthy
			}
			pid = w.pid
			cw.Handed, cw.Active = d.mode.conns(w.pid)
			if w.cgroup != "" && w.state != stExited {
				l := d.app.Limits
				cw.Cgroup = &control.Cgroup{Path: w.cgroup, MemoryHigh: l.MemoryHigh, MemoryMax: l.MemoryMax, OOMKills: s.oomKills}
			}
		}
		st.Workers = append(st.Workers, cw)
		snap.procs = append(snap.procs, pid)
	}
	seen := map[*worker]bool{}
	for _, s := range d.slots {
		add(s, s.cur)
		seen[s.cur] = true
	}
	for _, w := range d.procs {
		if !seen[w] {
			add(w.slot, w)
		}
	}
	idx := make([]int, len(st.Workers))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool {
		wa, wb := st.Workers[idx[a]], st.Workers[idx[b]]
		if wa.Index != wb.Index {
			return wa.Index < wb.Index
		}
		return wa.Generation < wb.Generation
	})
	ws, ps := make([]control.Worker, len(idx)), make([]int, len(idx))
	for i, j := range idx {
		ws[i], ps[i] = st.Workers[j], snap.procs[j]
	}
	st.Workers, snap.procs = ws, ps
	snap.st = st
	return snap
}

// live is false while every slot's worker has missed its watchdog: its
// current worker is being stopped for it (or overdue and about to be),
// or the slot waits to restart after such a stop. Without a watchdog
// there is nothing to miss.
func (d *dispatcher) live(now time.Time) bool {
	if d.app.Watchdog <= 0 || len(d.slots) == 0 {
		return true
	}
	for _, s := range d.slots {
		w := s.cur
		switch {
		case w == nil && s.lastCause == causeWatchdog:
		case w != nil && w.cause == causeWatchdog:
		case w != nil && w.state == stReady && !w.lastPing.IsZero() && now.Sub(w.lastPing) > d.app.Watchdog:
		default:
			return true
		}
	}
	return false
}
