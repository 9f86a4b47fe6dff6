package dispatcher

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/coreos/go-systemd/v22/daemon"
)

// Rolling replacement of workers: a reload (SIGHUP or the control socket's
// "reload") and the control socket's "restart-worker" both go through
// replace. A replacement works slot by slot, reload_batch slots at a
// time: it starts a candidate worker for each slot of the batch, waits
// until every candidate is ready, then makes the candidates the slots'
// current workers and retires the old ones (drain, then stop_signal,
// stop_timeout, SIGKILL). It succeeds when every slot runs a candidate and
// every retired worker has been reaped.
//
// A candidate that exits, or is not ready within ready_timeout, fails the
// replacement: every candidate still starting is stopped, and the slots
// not replaced yet keep their old workers. Slots replaced by an earlier
// batch keep their new workers (they were ready); the failure says how
// many.
//
// While a candidate starts, its slot's current worker (s.cur) is still the
// old one, so the state machine treats the candidate as "detached": when
// it exits, its slot is not restarted (see exited).

// replaceKind is what a replacement is for.
type replaceKind int

const (
	kindReload        replaceKind = iota // a new generation from the re-read app file
	kindRestartWorker                    // one slot, same generation
	kindRecycle                          // one slot, same generation, for a [recycle] policy (recycle.go)
)

// spec is what a generation of workers is started from: everything fork
// reads from the dispatcher that a reload can change.
type spec struct {
	app  *appfile.App
	env  []string
	path string
	dir  string
	gen  int
}

// replacement is one rolling replacement in progress.
type replacement struct {
	kind    replaceKind
	why     string // "SIGHUP", "control socket", …
	started time.Time
	prev    spec // the spec before a reload, restored when it fails

	todo     []*slot            // slots still to replace, in order
	batch    map[*slot]*worker  // the current batch's candidates
	retiring map[*worker]bool   // old workers told to stop, not reaped yet
	added    int                // slots appended for a larger workers count (removed on failure)
	surplus  []*slot            // slots removed at the end for a smaller workers count
	total    int                // slots to replace, for the status line
	replaced int                // slots whose candidate took over
	waiters  []report           // who waits for the result (control requests)
	failedBy map[*worker]string // how a candidate ended, recorded at its exit
	batchMax int                // reload_batch
	cause    string             // a recycle's: "memory 512M > 400M"
}

// ctlState is the dispatcher's part of reloads and the control socket;
// it is owned by the loop goroutine like the rest of the dispatcher.
type ctlState struct {
	cur        *replacement    // nil when none is running
	reqs       chan ctlRequest // from the control socket's handler
	lastErr    string          // the last failed reload, for STATUS= (cleared by a successful one)
	socketPath string          // the control socket, "" when it could not be created
	loading    *pendingLoad    // a reload whose app file is being read (load.go)
	loadSeq    uint64          // numbers loads, so a late result is told apart
	reloads    control.Reloads // reloads by result, for status and metrics
}

// countReload records a finished reload that began at started.
func (d *dispatcher) countReload(ok bool, started, now time.Time) {
	r := &d.ctl.reloads
	if ok {
		r.OK++
		r.LastResult = "ok"
	} else {
		r.Failed++
		r.LastResult = "failed"
	}
	r.LastStarted, r.LastSeconds = started, now.Sub(started).Seconds()
}

// startReload begins a rolling reload from the re-read app file. It fails
// at once, workers untouched, when the file is invalid or changes what a
// reload cannot change ([[listen]], mode). done, if not nil, is called
// once with the result when the reload has finished.
func (d *dispatcher) startReload(why string, now time.Time, done report) {
	if d.sentReady && !d.stopping && !d.draining {
		d.yieldRecycle("a reload ("+why+")", now)
	}
	if d.stopping || d.draining {
		done.send(errors.New("reload refused: the dispatcher is stopping"))
		return
	}
	if !d.sentReady {
		// READY=1 at the end of a reload would tell systemd the service
		// is up before its first workers are.
		err := errors.New("reload refused: the first workers are not ready yet")
		d.out.warnf("%s: %v", why, err)
		done.send(err)
		return
	}
	if r := d.ctl.cur; r != nil {
		err := fmt.Errorf("reload refused: a %s started %s ago is still running", r.what(), now.Sub(r.started).Round(time.Millisecond))
		d.out.warnf("%s: %v", why, err)
		done.send(err)
		return
	}
	if p := d.ctl.loading; p != nil {
		err := fmt.Errorf("reload refused: the app file of a reload started %s ago is still being read", now.Sub(p.started).Round(time.Millisecond))
		d.out.warnf("%s: %v", why, err)
		done.send(err)
		return
	}
	// SdNotifyMonotonicUsec is "MONOTONIC_USEC=…\n" (CLOCK_MONOTONIC in µs),
	// or "" where that clock cannot be read.
	d.sendNotify("RELOADING=1\n" + daemon.SdNotifyMonotonicUsec() + "STATUS=reloading (" + why + ")")
	// The app file is read off the loop (load.go); onLoaded goes on
	// with beginReload.
	d.ctl.loadSeq++
	d.ctl.loading = &pendingLoad{why: why, started: now, done: done, seq: d.ctl.loadSeq}
	d.startLoad(d.current(), d.ctl.loadSeq, d.loadTimeout())
}

// beginReload starts the rolling replacement toward next, the spec read
// for a reload that began at started.
func (d *dispatcher) beginReload(why string, started time.Time, next spec, done report, now time.Time) {
	prev := d.current()
	r := &replacement{
		kind: kindReload, why: why, started: started, prev: prev,
		batch: map[*slot]*worker{}, retiring: map[*worker]bool{}, failedBy: map[*worker]string{},
		batchMax: max(next.app.ReloadBatch, 1),
	}
	if done != nil {
		r.waiters = append(r.waiters, done)
	}
	// workers: a changed value in the file applies; an unchanged one keeps
	// the count `cohort scale` may have set.
	n := len(d.slots)
	if next.app.Workers != prev.app.Workers {
		n = next.app.Workers.Count(d.limit.Count())
		if fixed := d.mode.fixedWorkers(); fixed.n > 0 {
			d.out.warnf("workers changed to %s, but %s, and there are %d: keeping %d workers (%s)",
				workersSetting(next.app.Workers), fixed.why, fixed.n, len(d.slots), recountHint)
			n = len(d.slots)
		}
	}
	for i := len(d.slots); i < n; i++ {
		d.slots = append(d.slots, &slot{index: i, delay: next.app.Restart.Initial})
		r.added++
	}
	if n < len(d.slots) {
		r.surplus = append(r.surplus, d.slots[n:]...)
	}
	r.todo = append(r.todo, d.slots[:n]...)
	r.total = len(r.todo)
	d.apply(next)
	d.ctl.cur = r
	d.out.infof("reloading (%s): generation %d, %d workers, %d at a time: %s", why, d.gen, n, r.batchMax, strings.Join(d.app.Command, " "))
	d.stepReplace(now)
}

// startRestartWorker gracefully replaces the worker of slot index: a new
// one starts, and the old one is retired once the new one is ready.
func (d *dispatcher) startRestartWorker(index int, now time.Time, done report) {
	switch {
	case d.stopping:
		done.send(errors.New("restart-worker refused: the dispatcher is stopping"))
		return
	case index >= 0 && index < len(d.slots):
		d.yieldRecycle(fmt.Sprintf("a restart of worker %d", index), now)
	}
	switch {
	case d.ctl.cur != nil:
		done.send(fmt.Errorf("restart-worker refused: a %s is running", d.ctl.cur.what()))
		return
	case index < 0 || index >= len(d.slots):
		done.send(fmt.Errorf("restart-worker: no worker %d (there are %d, 0 to %d)", index, len(d.slots), len(d.slots)-1))
		return
	}
	r := d.newReplacement(kindRestartWorker, fmt.Sprintf("restart of worker %d", index), []*slot{d.slots[index]}, now)
	if done != nil {
		r.waiters = append(r.waiters, done)
	}
	d.ctl.cur = r
	d.out.infof("restarting worker %d gracefully", index)
	d.stepReplace(now)
}

// newReplacement is a replacement of slots, one at a time, in the
// current generation (restart-worker, a recycle).
func (d *dispatcher) newReplacement(kind replaceKind, why string, slots []*slot, now time.Time) *replacement {
	return &replacement{
		kind: kind, why: why, started: now, prev: d.current(),
		batch: map[*slot]*worker{}, retiring: map[*worker]bool{}, failedBy: map[*worker]string{},
		todo: slots, total: len(slots), batchMax: 1,
	}
}

func (r *replacement) what() string {
	if r.kind == kindReload {
		return "reload"
	}
	return r.why
}

// stepReplace moves the running replacement on: it is called from the
// loop after every event. It detects failed candidates, swaps in a batch
// whose candidates are all ready, starts the next batch, and finishes.
func (d *dispatcher) stepReplace(now time.Time) {
	r := d.ctl.cur
	if r == nil {
		return
	}
	if err := d.batchFailed(r); err != nil {
		d.failReplace(err)
		return
	}
	if len(r.batch) > 0 {
		for _, w := range r.batch {
			if w.state != stReady {
				return // wait for the rest of the batch
			}
		}
		d.swapBatch(r)
	}
	if err := d.startBatch(r, now); err != nil {
		d.failReplace(err)
		return
	}
	if len(r.batch) > 0 {
		return
	}
	// Every slot replaced: drop the surplus, then wait for the retired.
	for _, s := range r.surplus {
		s.restartAt = time.Time{}
		if w := s.cur; w != nil {
			s.cur = nil
			d.retire(w, r)
		}
	}
	if len(r.surplus) > 0 {
		d.slots = d.slots[:len(d.slots)-len(r.surplus)]
		r.surplus = nil
	}
	if len(r.retiring) > 0 {
		return
	}
	d.finishReplace(now)
}

// batchFailed says how a candidate of r's batch failed: it left state
// starting without becoming ready (it exited, or missed ready_timeout).
func (d *dispatcher) batchFailed(r *replacement) error {
	for s, w := range r.batch {
		if w.state == stReady || w.state == stStarting {
			continue
		}
		how := r.failedBy[w]
		if how == "" {
			how = fmt.Sprintf("was not ready after ready_timeout (%s)", d.app.ReadyTimeout)
		}
		return fmt.Errorf("new worker %d (pid %d, generation %d) %s", s.index, w.pid, w.gen, how)
	}
	return nil
}

// swapBatch makes r's candidates, all ready, their slots' current workers
// and retires the old ones.
func (d *dispatcher) swapBatch(r *replacement) {
	for s, w := range r.batch {
		old := s.cur
		s.cur, s.restartAt = w, time.Time{}
		r.replaced++
		if old != nil && r.kind == kindRecycle {
			old.recycled = "recycled (" + r.cause + ")"
			s.recycles++
			s.lastRecycle = r.cause
			d.rec.total++
		}
		if old != nil {
			d.retire(old, r)
		}
	}
	clear(r.batch)
}

// startBatch starts candidates for up to reload_batch of the slots still
// to replace; it fails when one cannot be forked.
func (d *dispatcher) startBatch(r *replacement, now time.Time) error {
	for len(r.batch) < r.batchMax && len(r.todo) > 0 {
		s := r.todo[0]
		r.todo = r.todo[1:]
		if r.kind == kindReload && s.cur != nil && s.cur.gen == d.gen {
			// Restarted with the new spec after a crash during the reload.
			r.replaced++
			continue
		}
		w, err := d.spawnCandidate(s, now)
		if err != nil {
			return fmt.Errorf("new worker %d: %w", s.index, err)
		}
		r.batch[s] = w
	}
	if len(r.batch) > 0 && r.kind == kindReload {
		// systemd applies its start timeout to reloads; ask for time
		// for this batch (ignored where systemd does not extend it).
		d.sendNotify(fmt.Sprintf("EXTEND_TIMEOUT_USEC=%d", (d.app.ReadyTimeout + d.app.StopTimeout + 15*time.Second).Microseconds()))
	}
	return nil
}

// spawnCandidate forks a new worker for s without making it s's current
// worker. It fails when the fork does.
func (d *dispatcher) spawnCandidate(s *slot, now time.Time) (*worker, error) {
	old, oldRestart := s.cur, s.restartAt
	d.spawn(s, now)
	w := s.cur
	s.cur = old
	if w == old {
		s.restartAt = oldRestart
		return nil, errors.New("could not be started (see the log)")
	}
	if old == nil {
		s.restartAt = time.Time{} // the candidate is the slot's restart
	}
	return w, nil
}

// retire takes w out of service: drain, then stop_signal (the state
// machine's stop path, stop_timeout, SIGKILL). w must no longer be its
// slot's current worker, so that its exit does not restart the slot.
func (d *dispatcher) retire(w *worker, r *replacement) {
	d.mode.drain(w.pid, true)
	if r != nil {
		r.retiring[w] = true
	}
	d.transition(w, trStop, 0)
}

// detachedExited handles the exit of a worker that is not its slot's
// current one: a candidate of a replacement, or a retired worker. Its
// slot is not restarted.
func (d *dispatcher) detachedExited(w *worker, how string, uptime time.Duration) {
	if w.recycled != "" {
		how = w.recycled + ": " + how
	}
	d.out.infof("worker %d (pid %d, generation %d) %s after %s", w.slot.index, w.pid, w.gen, how, uptime.Round(time.Millisecond))
	r := d.ctl.cur
	if r == nil {
		return
	}
	delete(r.retiring, w)
	if r.batch[w.slot] == w {
		r.failedBy[w] = how + " before it was ready"
	}
}

// failReplace ends the running replacement unsuccessfully: candidates are
// stopped, slots added for a larger workers count are removed, and a
// reload's previous spec is restored, so crashed workers restart as
// before.
func (d *dispatcher) failReplace(err error) {
	r := d.ctl.cur
	d.ctl.cur = nil
	for s, w := range r.batch {
		if s.cur != w && w.state != stExited {
			d.retire(w, nil)
		}
	}
	if r.added > 0 {
		for _, s := range d.slots[len(d.slots)-r.added:] {
			if s.cur != nil { // replaced by an earlier batch: the workers count is the old one again
				w := s.cur
				s.cur = nil
				d.retire(w, nil)
			}
		}
		d.slots = d.slots[:len(d.slots)-r.added]
	}
	if r.replaced > 0 {
		err = fmt.Errorf("%w; %d of %d workers had already been replaced and keep running generation %d", err, r.replaced, r.total, d.gen)
	}
	switch r.kind {
	case kindReload:
		d.apply(r.prev)
		err = fmt.Errorf("reload failed, old workers keep serving: %w", err)
	case kindRecycle:
		// A slot whose new workers fail to start is not retried at
		// once: at least restart's max backoff later.
		d.rec.nextAt = time.Now().Add(max(d.app.Recycle.MinInterval, d.app.Restart.Max))
		err = fmt.Errorf("%s failed, the old worker keeps serving (retried in %s at the earliest): %w", r.why, max(d.app.Recycle.MinInterval, d.app.Restart.Max), err)
	default:
		err = fmt.Errorf("%s failed, the old worker keeps serving: %w", r.why, err)
	}
	for _, done := range r.waiters {
		done.send(err)
	}
	if r.kind == kindReload {
		d.countReload(false, r.started, time.Now())
	}
	d.reloadFailed(err, nil, r.kind == kindReload)
}

// reloadFailed reports a failed reload or restart: the log, STATUS= (a
// reload's), READY=1 to end systemd's reloading state, and done.
func (d *dispatcher) reloadFailed(err error, done report, reload bool) {
	d.out.warnf("%v", err)
	if reload {
		d.ctl.lastErr = oneLine(err.Error())
		if !d.stopping {
			d.lastStatus = "" // resend STATUS= with the error along with READY=1
			d.sendNotify("READY=1")
		}
	}
	done.send(err)
}

// finishReplace ends the running replacement successfully.
func (d *dispatcher) finishReplace(now time.Time) {
	r := d.ctl.cur
	d.ctl.cur = nil
	took := now.Sub(r.started).Round(time.Millisecond)
	if r.kind == kindReload {
		d.countReload(true, r.started, now)
		d.ctl.lastErr = ""
		d.out.infof("reload done in %s: %d workers of generation %d", took, len(d.slots), d.gen)
		d.lastStatus = ""
		d.sendNotify("READY=1")
	} else {
		d.out.infof("%s done in %s", r.why, took)
	}
	if r.kind == kindRecycle {
		d.rec.nextAt = now.Add(d.app.Recycle.MinInterval)
	}
	for _, done := range r.waiters {
		done.send(nil)
	}
}

// abortReplace fails a running replacement because the dispatcher stops.
func (d *dispatcher) abortReplace() {
	d.yieldRecycle("the stop", time.Now())
	d.abortLoad()
	if d.ctl.cur != nil {
		d.failReplace(errors.New("the dispatcher is stopping"))
	}
}

// recountHint says how to change the number of workers of a reuseport
// app: its sockets are bound per worker before the dispatcher starts.
const recountHint = "to change the count, change workers in the app file and restart the app; under systemd: systemctl stop APP.socket APP, then daemon-reload, then systemctl start APP.socket"

// scale changes the number of slots at once (no reload): new slots start
// workers now, surplus slots' workers are retired.
func (d *dispatcher) scale(n int, now time.Time) error {
	switch {
	case d.stopping || d.draining:
		return errors.New("scale refused: the dispatcher is stopping")
	}
	d.yieldRecycle("a scale", now)
	switch {
	case d.ctl.cur != nil:
		return fmt.Errorf("scale refused: a %s is running; try again when it has finished", d.ctl.cur.what())
	case n < 1 || n > appfile.MaxWorkers:
		return fmt.Errorf("scale: want 1 to %d workers, got %d", appfile.MaxWorkers, n)
	}
	if fixed := d.mode.fixedWorkers(); fixed.n > 0 && n != len(d.slots) {
		return fmt.Errorf("scale refused: %s, and there are %d (%s)", fixed.why, len(d.slots), recountHint)
	}
	old := len(d.slots)
	switch {
	case n > old:
		for i := old; i < n; i++ {
			s := &slot{index: i, delay: d.app.Restart.Initial}
			d.slots = append(d.slots, s)
			d.spawn(s, now)
		}
	case n < old:
		for _, s := range d.slots[n:] {
			s.restartAt = time.Time{}
			if w := s.cur; w != nil {
				s.cur = nil
				d.retire(w, nil)
			}
		}
		d.slots = d.slots[:n]
	}
	if n != old {
		d.out.infof("scaled from %d to %d workers", old, n)
	}
	return nil
}

// current is the spec new workers are started from now.
func (d *dispatcher) current() spec {
	return spec{app: d.app, env: d.env, path: d.path, dir: d.dir, gen: d.gen}
}

// apply makes sp the spec new workers are started from.
func (d *dispatcher) apply(sp spec) {
	d.app, d.env, d.path, d.dir, d.gen = sp.app, sp.env, sp.path, sp.dir, sp.gen
}

// loadSpec re-reads the app (Options.Load) and prepares the generation
// after cur, refusing what a reload cannot change. It runs off the loop
// (load.go), so it reads nothing of d that the loop changes: cur is the
// loop's snapshot.
func (d *dispatcher) loadSpec(cur spec) (spec, error) {
	load := d.opt.Load
	if load == nil {
		load = d.defaultLoad
	}
	app, err := load()
	if err != nil {
		return spec{}, err
	}
	if len(app.Command) == 0 {
		return spec{}, fmt.Errorf("app %s: no command", app.Name)
	}
	if !reflect.DeepEqual(app.Listen, cur.app.Listen) {
		return spec{}, fmt.Errorf("[[listen]] changed: a reload cannot change the listening sockets, which systemd owns; run 'systemctl daemon-reload', then 'systemctl restart %s.socket' (under 'cohort run': restart it)", cur.app.Name)
	}
	if app.Metrics.Listen != cur.app.Metrics.Listen {
		return spec{}, fmt.Errorf("[metrics] listen changed: a reload cannot change the metrics socket, which systemd owns; run 'systemctl daemon-reload', then 'systemctl restart %s.socket' (under 'cohort run': restart it)", cur.app.Name)
	}
	if app.Mode != cur.app.Mode {
		return spec{}, fmt.Errorf("mode changed from %q to %q: a reload cannot change the mode; run 'systemctl daemon-reload', then 'systemctl restart %s'", cur.app.Mode, app.Mode, cur.app.Name)
	}
	if err := d.cg.check(app.Limits); err != nil {
		return spec{}, err
	}
	env, path, err := prepareCommand(app, d.opt.Environ)
	if err != nil {
		return spec{}, err
	}
	env = nodePreloadEnv(app, env, d.opt.NodePreload, d.out.warnf)
	return spec{app: app, env: env, path: path, dir: app.WorkingDirectory, gen: cur.gen + 1}, nil
}

// defaultLoad re-reads the app file the App came from; an App built
// without a file (cohort run --listen … -- CMD) is reused as it is, so a
// reload restarts the same command (new code at the same path).
func (d *dispatcher) defaultLoad() (*appfile.App, error) {
	if d.opt.App.Path == "" {
		return d.opt.App, nil
	}
	return appfile.ParseFile(d.opt.App.Path)
}

// replaceStatus is what the status line says about a replacement.
func (d *dispatcher) replaceStatus() string {
	if d.ctl.loading != nil {
		return " · reloading: reading the app file"
	}
	if r := d.ctl.cur; r != nil && r.kind == kindReload {
		return fmt.Sprintf(" · reloading: %d/%d replaced", r.replaced, r.total)
	}
	if r := d.ctl.cur; r != nil && r.kind == kindRecycle {
		return " · " + r.why
	}
	if d.ctl.lastErr != "" {
		return " · " + d.ctl.lastErr
	}
	return ""
}

// report is how a reload or a restart-worker tells whoever asked for it
// how it ended (nil: it succeeded). It is called once, on the loop, and
// must not block: the control socket's is a send on a buffered channel.
// A nil report is asked by nobody (SIGHUP).
type report func(err error)

func (done report) send(err error) {
	if done != nil {
		done(err)
	}
}

// oneLine makes a multi-line error (config errors) fit one status line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}
