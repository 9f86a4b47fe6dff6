package dispatcher

import (
	"errors"
	"fmt"
	"time"
)

// A reload reads the app file and its environment files, stats the
// command and the working directory: I/O that a FIFO, a hung network
// file system or a slow disk can stretch without bound. None of it runs
// on the supervision loop (issue 14.3): startReload hands the current
// spec to a loader goroutine and returns; the loop goes on reaping,
// restarting and answering `cohort status`, and receives the loader's
// result as one more event (d.loadCh), which beginReload turns into the
// rolling replacement.

// loadTimeout is how long a reload may take to read and check the app
// file before it fails with the old workers untouched. Reading a file of
// config.MaxFileSize from a local disk takes milliseconds.
const loadTimeout = 10 * time.Second

func (d *dispatcher) loadTimeout() time.Duration {
	if d.opt.LoadTimeout > 0 {
		return d.opt.LoadTimeout
	}
	return loadTimeout
}

// pendingLoad is a reload whose app file is being read off the loop.
type pendingLoad struct {
	why     string
	started time.Time
	done    report
	seq     uint64
}

// loadResult is what the loader reports to the loop.
type loadResult struct {
	seq  uint64
	next spec
	err  error
}

// startLoad reads the next generation's spec off the loop. The loader
// goroutine is the dispatcher's (d.wg): it ends when the read ends or
// after timeout, whichever comes first, and reports to the loop unless
// Run is returning. A read still hanging at the timeout is left to a
// goroutine of its own, which nothing waits for: a read(2) cannot be
// interrupted, and it must not keep Run from returning; it ends when the
// read returns, or with the process.
func (d *dispatcher) startLoad(cur spec, seq uint64, timeout time.Duration) {
	d.wg.Go(func() {
		got := make(chan loadResult, 1) // buffered: an abandoned read does not block
		go func() {
			next, err := d.loadSpec(cur)
			got <- loadResult{seq: seq, next: next, err: err}
		}()
		var res loadResult
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case res = <-got:
		case <-t.C:
			res = loadResult{seq: seq, err: fmt.Errorf("reading the app file took longer than %s (a FIFO, or a hung file system?)", timeout)}
		case <-d.goCtx.Done():
			return
		}
		select {
		case d.loadCh <- res:
		case <-d.goCtx.Done():
		}
	})
}

// onLoaded is the loop's side of a finished load: it starts the rolling
// replacement, or reports why the reload failed.
func (d *dispatcher) onLoaded(res loadResult, now time.Time) {
	p := d.ctl.loading
	if p == nil || p.seq != res.seq {
		return // aborted (the dispatcher stops); already answered
	}
	d.ctl.loading = nil
	switch {
	case res.err != nil:
		d.countReload(false, p.started, now)
		d.reloadFailed(fmt.Errorf("reload failed, workers untouched: %w", res.err), p.done, true)
	case d.stopping || d.draining:
		p.done.send(errStoppingReload)
	case d.ctl.cur != nil:
		d.countReload(false, p.started, now)
		d.reloadFailed(fmt.Errorf("reload failed, workers untouched: a %s began while the app file was read", d.ctl.cur.what()), p.done, true)
	default:
		d.beginReload(p.why, p.started, res.next, p.done, now)
	}
}

// errStoppingReload answers a reload that the dispatcher's stop overtook.
var errStoppingReload = errors.New("reload refused: the dispatcher is stopping")

// abortLoad answers a reload whose file is still being read when the
// dispatcher stops; its result, when it comes, is ignored.
func (d *dispatcher) abortLoad() {
	if p := d.ctl.loading; p != nil {
		d.ctl.loading = nil
		p.done.send(errStoppingReload)
	}
}
