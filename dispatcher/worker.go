package dispatcher

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/internal/probe"
	"github.com/cohort-dev/cohort/internal/cgroup"
	"golang.org/x/sys/unix"
)

// state is where a worker process is in its life.
type state int

const (
	stStarting state = iota // forked; not ready yet
	stReady                 // counted as serving
	stDraining              // told to stop (or stopping on its own); SIGKILL at deadline
	stExited                // reaped
)

var stateNames = [...]string{"starting", "ready", "draining", "exited"}

func (s state) String() string { return stateNames[s] }

// trigger is what happened to a worker; transition maps (state, trigger)
// to the next state.
type trigger int

const (
	trExeced          trigger = iota // the trampoline exec'd the command
	trReadyMsg                       // READY=1
	trListening                      // ready = "listening": seen accepting (listening.go)
	trDelay                          // the ready delay elapsed
	trWatchdogPing                   // WATCHDOG=1
	trWatchdogTrigger                // WATCHDOG=trigger
	trStopping                       // STOPPING=1: leaving on its own
	trDeadline                       // the state's deadline passed
	trStop                           // the dispatcher stops
	trKill                           // stop now
	trUnhealthy                      // its round-robin channel failed (worker.unhealthy says how): replace it
	trExited                         // reaped; the WaitStatus comes along
)

// crashLoopAfter is how many quick exits in a row make a slot "crash
// looping" in the status line.
const crashLoopAfter = 3

// slot is one worker index: it holds the current process, if any, and
// the restart policy's memory.
type slot struct {
	index       int
	cur         *worker        // nil while waiting for a restart
	restartAt   time.Time      // when to fork again (zero: not scheduled)
	delay       time.Duration  // the next backoff delay
	quickExits  int            // exits before min_uptime, in a row
	restarts    int            // restarts of this slot, for status
	recycles    int            // recycles of this slot (recycle.go), counted apart from restarts
	lastRecycle string         // why its last recycle was, for status
	gen         int            // generation of its last process, for status while in backoff
	oomKills    uint64         // kernel OOM kills in its earlier processes' cgroups, for status
	causes      map[string]int // restarts by cause (the worker's restartCause)
	lastCause   string         // the cause of the last restart, "" before one
}

func (s *slot) crashLooping() bool { return s.quickExits >= crashLoopAfter }

// worker is one worker process.
type worker struct {
	slot    *slot
	pid     int
	gen     int
	state   state
	started time.Time

	readyAt  time.Time // ready = "DURATION": becomes ready at this time
	deadline time.Time // starting: ready_timeout; ready: watchdog; draining: SIGKILL
	stableAt time.Time // ready in a slot with quick exits: when they stop counting (clearQuickExits)

	lastPing  time.Time      // last WATCHDOG=1; zero: watchdog not armed
	signalled bool           // stop_signal (or SIGABRT) was sent
	sent      syscall.Signal // that signal, so its exit reads as a stop, not a crash
	killed    bool           // SIGKILL was sent
	killWhy   string         // why, for the exit line ("" when asked to stop at once)
	unhealthy string         // why it is being replaced as unhealthy (round-robin), for status
	cause     string         // why cohort stopped it, when for its health: "watchdog", "ready_timeout", "unhealthy"
	silent    bool           // it never spoke the round-robin protocol: its exit counts as a failed start
	status    string         // last STATUS=
	probe     probe.Targets  // the sockets ready = "listening" watches, from its mode's start
	cgroup    string         // its own cgroup's directory (cgroups.go); "" when it has none
	oomKilled bool           // memory.events says the kernel's OOM killer killed in it

	endProbe func() // stops the ready = "listening" probe; nil when none runs

	// [recycle] limits drawn at its fork (recycle.go's drawLimits).
	recycleAt  time.Time     // max_lifetime + lifeJitter after its start; zero: none
	lifeJitter time.Duration // the part of max_lifetime_jitter drawn
	maxConns   uint64        // max_connections + connJitter; 0: none
	connJitter int           // the part of max_connections_jitter drawn
	recycled   string        // "recycled (…)" once it was retired by a recycle, for its exit line
}

// stopProbe ends w's ready = "listening" probe, if one runs.
func (w *worker) stopProbe() {
	if w.endProbe != nil {
		w.endProbe()
		w.endProbe = nil
	}
}

// transition is the worker state machine: every state change of every
// worker happens here, with its side effects (signals, log lines,
// events, restart scheduling).
func (d *dispatcher) transition(w *worker, tr trigger, ws unix.WaitStatus) {
	now := time.Now()
	app := d.app

	if tr == trExited {
		d.exited(w, ws, now)
		return
	}
	switch w.state {
	case stStarting:
		switch tr {
		case trExeced:
			switch app.Ready.Kind {
			case appfile.ReadyExec:
				d.toReady(w, now)
			case appfile.ReadyDelay:
				w.readyAt = now.Add(app.Ready.Delay)
			case appfile.ReadyListening:
				d.startProbe(w)
			}
		case trListening:
			d.settle(w, now)
		case trReadyMsg:
			if app.Ready.Kind != appfile.ReadyListening {
				d.toReady(w, now)
			}
			// "listening" believes only what it sees: gunicorn's
			// master, for one, says READY=1 before its workers accept.
		case trDelay:
			d.toReady(w, now)
		case trWatchdogPing:
			w.lastPing = now
		case trWatchdogTrigger:
			d.out.warnf("worker %d (pid %d) asked to be treated as hung (WATCHDOG=trigger) before ready; sending SIGABRT", w.slot.index, w.pid)
			d.observe(Event{Kind: WorkerWatchdog, Worker: w.slot.index, PID: w.pid, Gen: w.gen})
			w.cause = causeWatchdog
			d.toDraining(w, now, d.sendAbort)
		case trStopping:
			d.toDraining(w, now, nil)
		case trDeadline:
			d.out.warnf("worker %d (pid %d) not ready after ready_timeout (%s); stopping it", w.slot.index, w.pid, app.ReadyTimeout)
			w.cause = causeReadyTimeout
			d.toDraining(w, now, d.sendStop)
		case trUnhealthy:
			d.observe(Event{Kind: WorkerUnhealthy, Worker: w.slot.index, PID: w.pid, Gen: w.gen})
			w.cause = causeUnhealthy
			d.toDraining(w, now, d.sendStop)
		case trStop:
			d.toDraining(w, now, d.sendStop)
		case trKill:
			d.toDraining(w, now, nil)
			d.kill(w, "")
		}
	case stReady:
		switch tr {
		case trWatchdogPing:
			w.lastPing = now
			if app.Watchdog > 0 {
				w.deadline = now.Add(app.Watchdog)
			}
		case trDeadline, trWatchdogTrigger:
			why := fmt.Sprintf("missed its watchdog (%s)", app.Watchdog)
			if tr == trWatchdogTrigger {
				why = "asked to be treated as hung (WATCHDOG=trigger)"
			}
			d.out.warnf("worker %d (pid %d) %s; sending SIGABRT", w.slot.index, w.pid, why)
			d.observe(Event{Kind: WorkerWatchdog, Worker: w.slot.index, PID: w.pid, Gen: w.gen})
			w.cause = causeWatchdog
			d.toDraining(w, now, d.sendAbort)
		case trStopping:
			d.out.infof("worker %d (pid %d) is stopping on its own", w.slot.index, w.pid)
			d.toDraining(w, now, nil)
		case trUnhealthy:
			d.observe(Event{Kind: WorkerUnhealthy, Worker: w.slot.index, PID: w.pid, Gen: w.gen})
			w.cause = causeUnhealthy
			d.toDraining(w, now, d.sendStop)
		case trStop:
			d.toDraining(w, now, d.sendStop)
		case trKill:
			d.toDraining(w, now, nil)
			d.kill(w, "")
		}
	case stDraining:
		switch tr {
		case trStop:
			if !w.signalled {
				d.sendStop(w)
			}
		case trDeadline:
			d.out.warnf("worker %d (pid %d) still running %s after it was told to stop; sending SIGKILL", w.slot.index, w.pid, app.StopTimeout)
			d.kill(w, fmt.Sprintf("it did not stop within stop_timeout %s", app.StopTimeout))
		case trKill:
			d.kill(w, "")
		}
	}
}

// toReady moves w to stReady: its watchdog deadline is armed, its mode
// may hand it connections, and the log and observers hear of it.
func (d *dispatcher) toReady(w *worker, now time.Time) {
	app := d.app
	w.stopProbe()
	w.state, w.readyAt, w.deadline = stReady, time.Time{}, time.Time{}
	if w.slot.quickExits > 0 && w.slot.cur == w {
		w.stableAt = w.started.Add(app.Restart.MinUptime)
	}
	if app.Watchdog > 0 && !w.lastPing.IsZero() {
		w.deadline = w.lastPing.Add(app.Watchdog)
	}
	d.mode.ready(w.pid)
	d.out.infof("worker %d (pid %d) ready after %s", w.slot.index, w.pid, now.Sub(w.started).Round(time.Millisecond))
	d.observe(Event{Kind: WorkerReady, Worker: w.slot.index, PID: w.pid, Gen: w.gen})
}

// toDraining moves w to stDraining, takes it out of its mode's service
// and then sends what send sends (sendStop, sendAbort; nil when it stops
// on its own or is killed at once).
func (d *dispatcher) toDraining(w *worker, now time.Time, send func(*worker)) {
	w.stopProbe()
	w.state, w.readyAt = stDraining, time.Time{}
	w.deadline = now.Add(d.app.StopTimeout)
	d.mode.drain(w.pid, false) // nothing new before the signal
	if send != nil {
		send(w)
	}
}

// sendStop sends stop_signal: to the worker's process group, or with
// kill_mode = "mixed" to its main process only, so that a master such as
// gunicorn's stops its own children gracefully instead of finding them
// killed under it.
func (d *dispatcher) sendStop(w *worker) {
	w.signalled, w.sent = true, d.app.StopSignal
	target := -w.pid
	if d.app.KillMode == appfile.KillModeMixed {
		target = w.pid
	}
	unix.Kill(target, d.app.StopSignal)
}

// sendAbort is the watchdog's SIGABRT, to the hung main process only.
func (d *dispatcher) sendAbort(w *worker) {
	w.signalled, w.sent = true, syscall.SIGABRT
	unix.Kill(w.pid, syscall.SIGABRT)
}

// kill SIGKILLs w's whole process group, whatever kill_mode says, and
// with a cgroup of its own everything in it: what left the group too.
func (d *dispatcher) kill(w *worker, why string) {
	if !w.killed {
		w.killed, w.killWhy = true, why
		unix.Kill(-w.pid, unix.SIGKILL)
		d.killCgroup(w)
	}
	w.deadline = time.Time{}
}

// exited moves a reaped worker to stExited, logs how it ended and
// schedules its slot's restart with backoff unless the dispatcher stops.
func (d *dispatcher) exited(w *worker, ws unix.WaitStatus, now time.Time) {
	w.stopProbe()
	w.state, w.deadline, w.readyAt = stExited, time.Time{}, time.Time{}
	delete(d.procs, w.pid)
	d.mode.exited(w.pid)
	d.noteOOM(w)
	d.releaseCgroup(w, now)
	s := w.slot
	detached := s.cur != w // a reload's candidate or a retired worker (reload.go)
	if s.cur == w {
		s.cur = nil
	}
	uptime := now.Sub(w.started)
	ev := Event{Kind: WorkerExited, Worker: s.index, PID: w.pid, Gen: w.gen, Uptime: uptime, ExitCode: -1, Reason: w.recycled}
	delete(d.rec.over, w.pid)
	how := describeExit(ws, w)
	if ws.Signaled() {
		ev.Signal = ws.Signal()
	} else {
		ev.ExitCode = ws.ExitStatus()
	}
	if d.stopping {
		d.out.infof("worker %d (pid %d) %s after %s", s.index, w.pid, how, uptime.Round(time.Millisecond))
		d.observe(ev)
		return
	}
	if detached {
		d.detachedExited(w, how, uptime)
		d.observe(ev)
		return
	}
	up := uptime
	if w.silent {
		up = 0 // a program that cannot serve in this mode: back off as from a crash at start
	}
	ev.RestartIn = d.scheduleRestart(s, up, restartCause(w, ws), now)
	msg := fmt.Sprintf("worker %d (pid %d) %s after %s; restarting in %s", s.index, w.pid, how, uptime.Round(time.Millisecond), ev.RestartIn)
	if s.crashLooping() {
		d.out.warnf("%s (crash loop: %d quick exits in a row)", msg, s.quickExits)
	} else {
		d.out.warnf("%s", msg)
	}
	d.observe(ev)
}

// The causes of restarts (status's RestartCauses, the metrics' cause
// label).
const (
	causeExited       = "exited"        // it exited on its own (any status, or STOPPING=1)
	causeCrashed      = "crashed"       // killed by a signal cohort did not send
	causeOOMKilled    = "oom_killed"    // killed by the kernel's OOM killer (its cgroup's memory.events)
	causeWatchdog     = "watchdog"      // missed its watchdog or sent WATCHDOG=trigger
	causeReadyTimeout = "ready_timeout" // not ready within ready_timeout
	causeUnhealthy    = "unhealthy"     // its round-robin channel failed
	causeSpawnFailed  = "spawn_failed"  // it could not be forked
)

// restartCause is why the reaped worker w ended, for its slot's restart.
func restartCause(w *worker, ws unix.WaitStatus) string {
	switch {
	case w.cause != "":
		return w.cause
	case w.silent:
		return causeUnhealthy
	case ws.Signaled() && ws.Signal() == unix.SIGKILL && !w.killed && w.oomKilled:
		return causeOOMKilled // as describeExit names it: counted apart from crashes, seen while the slot waits
	case ws.Signaled() && !w.killed && (w.sent == 0 || ws.Signal() != w.sent):
		return causeCrashed
	}
	return causeExited
}

// scheduleRestart applies the backoff policy to a slot whose process
// ended after uptime, for cause, and returns the delay before the next
// fork.
func (d *dispatcher) scheduleRestart(s *slot, uptime time.Duration, cause string, now time.Time) time.Duration {
	r := d.app.Restart
	if uptime >= r.MinUptime {
		s.delay, s.quickExits = r.Initial, 0
	} else {
		s.quickExits++
	}
	wait := s.delay
	s.delay = min(2*max(s.delay, time.Millisecond), r.Max)
	s.restartAt = now.Add(wait)
	d.restarts++
	s.restarts++
	if s.causes == nil {
		s.causes = map[string]int{}
	}
	s.causes[cause]++
	s.lastCause = cause
	return wait
}

// describeExit says how w ended, for the log and a failed reload's
// message. A death by a signal that cohort sent reads as the stop it
// was ("stopped (SIGTERM sent by cohort)"), and an exit after one names
// it ("exited with status 0 (SIGTERM sent by cohort)"); only a signal
// cohort did not send reads as a crash ("was killed by signal 11
// (segmentation fault)").
func describeExit(ws unix.WaitStatus, w *worker) string {
	sentBy := func(sig syscall.Signal, why string) string {
		s := unix.SignalName(sig) + " sent by cohort"
		if why != "" {
			s += ": " + why
		}
		return s
	}
	var s string
	switch {
	case ws.Signaled() && ws.Signal() == unix.SIGKILL && w.killed:
		s = "stopped (" + sentBy(unix.SIGKILL, w.killWhy) + ")"
	case ws.Signaled() && ws.Signal() == unix.SIGKILL && w.oomKilled:
		s = "was killed by the kernel's OOM killer (memory.events oom_kill)"
	case ws.Signaled() && w.sent != 0 && ws.Signal() == w.sent:
		s = "stopped (" + sentBy(w.sent, "") + ")"
	case ws.Signaled():
		s = fmt.Sprintf("was killed by signal %d (%s)", ws.Signal(), ws.Signal())
	default:
		s = fmt.Sprintf("exited with status %d", ws.ExitStatus())
		switch {
		case w.killed:
			s += " (" + sentBy(unix.SIGKILL, w.killWhy) + ")"
		case w.sent != 0:
			s += " (" + sentBy(w.sent, "") + ")"
		}
	}
	if ws.Signaled() && ws.CoreDump() {
		s += ", core dumped"
	}
	return s
}

// spawn forks a worker for slot s through the trampoline. On failure the
// slot is scheduled for a restart as if the worker had exited at once.
func (d *dispatcher) spawn(s *slot, now time.Time) {
	ws, err := d.mode.start(s.index)
	var pid int
	var outR, statusR *os.File
	var cg string
	if err == nil {
		// The worker's own cgroup (cgroups.go), which fork starts it in.
		var f *os.File
		if cg, f, err = d.newWorkerCgroup(s.index); err == nil {
			pid, outR, statusR, err = d.forkInto(s, ws.args, cg, f)
			if f != nil {
				f.Close()
			}
			if err != nil && cg != "" {
				cgroup.Remove(cg)
			}
		}
		if ws.forked != nil {
			ws.forked(pid)
		}
	}
	if err != nil {
		wait := d.scheduleRestart(s, 0, causeSpawnFailed, now)
		d.out.warnf("worker %d: %v; retrying in %s", s.index, err, wait)
		d.observe(Event{Kind: WorkerSpawnFailed, Worker: s.index, Err: err, RestartIn: wait})
		return
	}
	w := &worker{slot: s, pid: pid, gen: d.gen, state: stStarting, started: now, probe: ws.probe, cgroup: cg}
	w.deadline = now.Add(d.app.ReadyTimeout)
	drawLimits(w, d.app.Recycle, now)
	s.cur, s.gen = w, d.gen
	d.procs[pid] = w
	tag := workerTag{Index: s.index, PID: pid, Gen: d.gen}
	d.track(outR)
	d.track(statusR)
	d.wg.Go(func() {
		defer d.untrack(outR)
		d.out.copyLines(tag, outR)
	})
	d.wg.Go(func() {
		defer d.untrack(statusR)
		defer statusR.Close()
		b, _ := io.ReadAll(io.LimitReader(statusR, 4096))
		select {
		case d.execCh <- execResult{pid: pid, err: string(b)}:
		case <-d.goCtx.Done():
		}
	})
	d.observe(Event{Kind: WorkerStarted, Worker: s.index, PID: pid, Gen: d.gen})
}

// fork starts the trampoline for slot s with a.fds at fds 3.. (and the
// LISTEN_* variables for them, and a.env) and returns its pid with the
// read ends of its output pipe and its exec-status pipe (both owned by
// the caller). It does not close a's fds. Nothing stays open on error.
func (d *dispatcher) fork(s *slot, a forkArgs) (pid int, outR, statusR *os.File, err error) {
	outR, outW, err := pipe()
	if err != nil {
		return 0, nil, nil, fmt.Errorf("output pipe: %w", err)
	}
	statusR, statusW, err := pipe()
	if err != nil {
		outR.Close()
		unix.Close(outW)
		return 0, nil, nil, fmt.Errorf("status pipe: %w", err)
	}
	n := len(a.fds)
	files := make([]uintptr, 0, 4+n)
	files = append(files, d.devnull.Fd(), uintptr(outW), uintptr(outW))
	files = append(files, a.fds...)
	files = append(files, uintptr(statusW))

	cpu := -1
	if d.app.CPUAffinity {
		cpu = d.cpus[s.index%len(d.cpus)]
	}
	argv := make([]string, 0, 5+len(d.app.Command))
	argv = append(argv, d.self, TrampolineArg, strconv.Itoa(3+n), strconv.Itoa(cpu), d.path)
	argv = append(argv, d.app.Command...)

	env := make([]string, 0, len(d.env)+8+len(a.env))
	env = append(env, d.env...)
	if n > 0 {
		env = append(env, "LISTEN_FDS="+strconv.Itoa(n), "LISTEN_FDNAMES="+a.names)
	}
	env = append(env, a.env...)
	if a.cgroupPath != "" {
		env = append(env, trampolineCgroupEnv+"="+a.cgroupPath)
	}
	env = append(env,
		"NOTIFY_SOCKET="+d.notifyPath,
		"COHORT_APP="+d.app.Name,
		"COHORT_WORKER="+strconv.Itoa(s.index),
		"COHORT_GENERATION="+strconv.Itoa(d.gen),
		"COHORT_CPUS="+strconv.Itoa(d.limit.Count()),
	)
	if d.app.Watchdog > 0 {
		env = append(env, "WATCHDOG_USEC="+strconv.FormatInt(d.app.Watchdog.Microseconds(), 10))
	}

	pid, err = syscall.ForkExec(d.self, argv, &syscall.ProcAttr{
		Dir:   d.dir,
		Env:   env,
		Files: files,
		Sys:   a.sysProcAttr(),
	})
	unix.Close(outW)
	unix.Close(statusW)
	if err != nil {
		outR.Close()
		statusR.Close()
		return 0, nil, nil, fmt.Errorf("fork %s: %w", d.self, err)
	}
	return pid, outR, statusR, nil
}

// pipe returns a CLOEXEC pipe: a pollable read end owned by an *os.File
// and a blocking raw write end the caller closes.
func pipe() (*os.File, int, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, -1, fmt.Errorf("pipe2: %w", err)
	}
	if err := unix.SetNonblock(p[0], true); err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return nil, -1, fmt.Errorf("pipe: set nonblocking: %w", err)
	}
	return os.NewFile(uintptr(p[0]), "|0"), p[1], nil
}
