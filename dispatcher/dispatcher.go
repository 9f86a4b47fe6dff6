package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/internal/notify"
	"github.com/cohort-dev/cohort/internal/cpuset"
	"github.com/cohort-dev/cohort/internal/journal"
	"golang.org/x/sys/unix"
)

// Options configure one Run. App and, when the app has [[listen]]
// entries, Listeners are required; the rest has defaults.
type Options struct {
	// App is the app to run. Run does not modify it.
	App *appfile.App
	// Listeners are the listening sockets in App.Listen order (see
	// sockets.Match and sockets.Bind). In shared mode Run puts them in blocking
	// mode and passes them to every worker; in round-robin mode it accepts
	// on duplicates of them, in non-blocking mode. It never closes them:
	// the caller owns them.
	Listeners []*os.File
	// SlotListeners are, in reuseport mode (and only there), each worker
	// slot's own listening sockets, SlotListeners[i] in App.Listen order
	// (see sockets.MatchSlots and sockets.BindSlots): one worker runs per entry,
	// and worker i is handed only SlotListeners[i]. Run keeps them all
	// open while workers come and go, so connections that the kernel
	// steers to a slot whose worker is being replaced wait in its queue.
	// The caller owns them.
	SlotListeners [][]*os.File
	// Metrics is the metrics listener ([metrics] listen), nil for none:
	// Run serves /metrics, /readyz and /livez on it (metrics.go) on a
	// duplicate, which it closes; the caller owns Metrics.
	Metrics *os.File

	// Self is the executable that runs Trampoline when argv[1] is
	// TrampolineArg; "" means /proc/self/exe.
	Self string
	// Environ is the environment workers inherit (minus the dispatcher's
	// private variables, see the package doc); nil means os.Environ().
	Environ []string
	// CPUs are the CPUs cpu_affinity pins to and workers = "auto"
	// counts (within Limit); nil means Limit's Allowed.
	CPUs []int
	// Limit is what workers = "auto" and every worker's COHORT_CPUS
	// count: the affinity mask, cgroup cpuset and CPU quota; nil means
	// cpuset.Read(), or CPUs alone when CPUs is set.
	Limit *cpuset.Limit
	// RuntimeDir holds the notify socket; "" means $RUNTIME_DIRECTORY (its
	// first entry) from Environ, else a private directory under
	// os.TempDir() that Run removes.
	RuntimeDir string

	// Stdout receives worker output, "app.N | line"s, whole lines in
	// each write; Stderr receives the dispatcher's own log lines. Each is
	// written by a goroutine of its own from a bounded queue, so a writer
	// that blocks never blocks supervision: lines it has no room for are
	// dropped and counted on Stderr (internal/logrelay). nil means os.Stdout and
	// os.Stderr.
	Stdout, Stderr io.Writer
	// Color: Stdout and Stderr are terminals, so worker labels get their
	// colours and control characters in lines are made visible
	// (internal/logline); not in journal mode.
	Color bool
	// NodePreload is the Node preload module's file (node_preload in
	// cohort.toml(5)); "" means DefaultNodePreload.
	NodePreload string
	// Journal sends worker lines to the journal with COHORT_WORKER,
	// COHORT_PID and COHORT_GENERATION fields (falling back to Stdout when
	// the journal refuses them) and prefixes log lines on Stderr with
	// syslog priorities, for a Stderr that is a journal stream.
	Journal bool

	// Notify sends one sd_notify message toward systemd (READY=1,
	// STATUS=…, WATCHDOG=1, STOPPING=1); nil sends nothing. Errors are
	// the callee's to log or drop: notification is best effort.
	Notify func(state string)
	// Watchdog is systemd's watchdog interval for the dispatcher
	// (daemon.SdWatchdogEnabled); WATCHDOG=1 is sent every half of it
	// from the supervision loop. Zero disables it.
	Watchdog time.Duration

	// HandleSignals makes Run stop gracefully on SIGTERM and SIGINT (a
	// second one kills the workers at once) and keeps SIGHUP from killing
	// the process. Without it only ctx stops Run.
	HandleSignals bool

	// Observe, when set, is called from the supervision loop for every
	// Event. It must return quickly and must not call back into Run.
	Observe func(Event)

	// Load re-reads the app for a reload (SIGHUP or the control socket);
	// nil re-reads App.Path, or reuses App when it has no Path.
	Load func() (*appfile.App, error)
	// Subreaper makes the process a child subreaper, so that what a
	// worker forks and leaves behind (a double-forked setsid daemon) is
	// reparented to it and killed once its worker has exited (see
	// orphans.go). Set it only when Run owns every child of the process:
	// Run then reaps any child that exits, and kills at its end any child
	// left.
	Subreaper bool
	// FailUnready makes Run stop the workers and return ErrNotReady
	// when no worker is ready ready_timeout after the start, as systemd
	// fails a Type=notify service that never sends READY=1
	// (TimeoutStartSec=, which the generator derives from
	// ready_timeout). cohort run sets it, so that a container whose app
	// cannot start exits non-zero and its runtime restarts it with its
	// own backoff; after the first READY=1, exits are restarted as
	// always.
	FailUnready bool
	// LoadTimeout bounds a reload's reading of the app: Load, the
	// environment files, the command's lookup. A reload that takes longer
	// fails and the old workers keep serving; the read goes on off the
	// supervision loop, which never waits for it. Zero means 10s.
	LoadTimeout time.Duration
	// JournalSocket is journald's native socket, for Journal; ""
	// means /run/systemd/journal/socket.
	JournalSocket string

	// Cgroups gives every worker a cgroup of its own (cgroups.go): Run
	// makes its own cgroup v2 cgroup the base of the worker cgroups and
	// itself moves into a leaf there, "supervisor" (where systemd ≥ 254
	// with DelegateSubgroup=supervisor already put it). It needs a
	// cgroup that it may write and shares with no other process: a
	// service with Delegate=yes, a container with its own cgroup
	// namespace. Without one, workers share the dispatcher's cgroup, and
	// an app with [limits] is refused.
	Cgroups bool
	// CgroupsForLimitsOnly enables for the workers' cgroups only the
	// controllers the app's [limits] need (none without limits), not
	// all that status reads. For cohort run in a container: the
	// processes of an exec session (docker exec, kubectl exec) join the
	// container's cgroup, which the kernel refuses once it enables
	// controllers for its children. A reload cannot add a limit whose
	// controller is not enabled.
	CgroupsForLimitsOnly bool
	// CgroupBase, when set, is the cgroup v2 directory worker cgroups
	// are made in as it is, the dispatcher staying where it runs (tests;
	// it overrides Cgroups).
	CgroupBase string
}

// errUnknownMode is an app whose mode is none of the dispatcher's: only
// an App built without config's validation can have one.
var errUnknownMode = errors.New("unknown mode")

// ErrNotReady is what Run returns, with Options.FailUnready, when no
// worker was ready ready_timeout after the start.
var ErrNotReady = errors.New("no worker ready")

// Run supervises opt.App's workers until ctx is cancelled or, with
// HandleSignals, a SIGTERM or SIGINT arrives; then it stops them
// gracefully (stop_signal, stop_timeout, SIGKILL) and returns nil once all
// have been reaped. It returns an error without starting any worker when
// the options are unusable (no command, command not found, an environment
// file that cannot be read, a mode it does not implement), and, with
// FailUnready, one wrapping ErrNotReady after it stopped workers of which
// none became ready.
//
// Run locks its goroutine to one OS thread for its whole life: workers are
// forked from that thread, whose exit would deliver their
// PR_SET_PDEATHSIG.
func Run(ctx context.Context, opt Options) error {
	d, err := newDispatcher(opt)
	if err != nil {
		return err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	// SIGCHLD before the first fork, so no exit goes unnoticed. SIGPIPE:
	// a reader of stdout or stderr that goes away (cohort run | head -1)
	// must not kill the dispatcher and its workers; the write fails with
	// EPIPE instead (stream.go). Handled rather than ignored, so workers
	// do not inherit SIG_IGN.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGCHLD, syscall.SIGPIPE)
	if opt.HandleSignals {
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	}
	defer signal.Stop(sigs)

	if opt.Subreaper {
		if err := setSubreaper(); err != nil {
			d.out.close()
			return fmt.Errorf("app %s: %w", d.app.Name, err)
		}
	}
	if err := d.openCgroups(); err != nil {
		d.closeCgroups(0)
		d.out.close()
		return fmt.Errorf("app %s: %w", d.app.Name, err)
	}
	if err := d.open(); err != nil {
		d.close()
		return err
	}
	defer d.close()

	goCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d.goCtx = goCtx
	if err := d.mode.open(goCtx, len(d.slots)); err != nil {
		return fmt.Errorf("app %s: %w", d.app.Name, err)
	}
	d.wg.Go(func() {
		d.notify.Serve(goCtx, func(m notify.Datagram) bool {
			select {
			case d.notifyCh <- m:
				return true
			case <-goCtx.Done():
				return false
			}
		})
	})
	d.serveControl(goCtx, filepath.Dir(d.notifyPath)) // control.go
	d.serveMetrics(goCtx)                             // metrics.go
	if path := opt.App.Path; path != "" {
		d.wg.Go(func() { watchAppFile(goCtx, path, d.fileCh) }) // appfile.go
	}
	return d.loop(ctx, sigs)
}

// dispatcher is the state of one Run. Only the loop goroutine touches it,
// except the fields documented otherwise.
type dispatcher struct {
	opt  Options
	app  *appfile.App
	out  *output
	self string

	env  []string // base worker environment
	path string   // the resolved command
	dir  string   // working directory ("" inherits)
	cpus []int
	// limit is the CPU limit read at start: workers = "auto" and
	// COHORT_CPUS are limit.Count().
	limit cpuset.Limit

	mode mode // shared, reuseport or round-robin (mode.go)
	// socks are the listening sockets as status lists them, named for
	// sock_diag once at start (metrics.go).
	socks []listenerSock

	slots []*slot
	procs map[int]*worker // live (unreaped) workers by pid
	gen   int

	devnull    *os.File
	notify     *notify.Socket
	tempDir    string // removed by close when set
	notifyPath string

	goCtx    context.Context // cancelled when Run returns; for helper goroutines
	wg       sync.WaitGroup  // every goroutine Run started
	notifyCh chan notify.Datagram
	execCh   chan execResult
	probeCh  chan probeResult // ready = "listening" (listening.go)
	loadCh   chan loadResult  // a reload's app file, read off the loop (load.go)

	readersMu sync.Mutex
	readers   map[*os.File]struct{} // pipes being read by goroutines

	ctl ctlState     // reloads and control requests (reload.go, control.go)
	rec recycleState // [recycle] (recycle.go)
	cg  cgroups      // the workers' own cgroups (cgroups.go)
	// readMemory reads workers' memory for [recycle] memory, off the
	// loop (recycle.go's seam: treeRSS until cgroups plug in).
	readMemory memoryReader
	orph       orphanState // with Options.Subreaper (orphans.go)

	fileCh      chan string // the app file's first problem, from watchAppFile
	fileProblem string      // "" while the app file validates

	// Toward systemd.
	started       time.Time
	readyDeadline time.Time
	sentReady     bool
	lastStatus    string
	wdNext        time.Time
	stopping      bool
	// draining: asked to stop with drain_delay, /readyz says
	// 503 while the workers go on serving until drainUntil, then stop.
	draining   bool
	drainUntil time.Time
	drainWhy   string
	restarts   int
	foreign    int
	failed     error // why Run fails once the workers have ended (FailUnready)
}

// execResult is what a worker's exec-status pipe said: "" when the
// command was exec'd (or the trampoline died before saying anything).
type execResult struct {
	pid int
	err string
}

func newDispatcher(opt Options) (_ *dispatcher, err error) {
	app := opt.App
	if app == nil {
		return nil, errors.New("dispatcher: no app")
	}
	if len(app.Command) == 0 {
		return nil, fmt.Errorf("app %s: no command", app.Name)
	}
	d := &dispatcher{
		opt:      opt,
		app:      app,
		self:     opt.Self,
		dir:      app.WorkingDirectory,
		procs:    map[int]*worker{},
		gen:      1,
		notifyCh: make(chan notify.Datagram, 64),
		execCh:   make(chan execResult, 64),
		probeCh:  make(chan probeResult, 64),
		loadCh:   make(chan loadResult),
		fileCh:   make(chan string),
		readers:  map[*os.File]struct{}{},
		ctl:      ctlState{reqs: make(chan ctlRequest)},
		orph:     orphanState{killed: map[int]bool{}},
	}
	if d.self == "" {
		d.self = "/proc/self/exe"
	}
	// Without per-worker cgroups, what there is to read is the process
	// trees' RSS (issue 17, item 4's fallback).
	d.readMemory = treeRSS(os.Getpid())
	d.rec.source = "each worker's process-tree RSS from /proc (no per-worker cgroup)"
	d.out = openOutput(app, opt)
	defer func() {
		if err != nil {
			d.out.close()
		}
	}()
	if d.mode, err = newMode(app, opt, d.out); err != nil {
		return nil, err
	}
	if d.env, d.path, err = prepareCommand(app, opt.Environ); err != nil {
		return nil, err
	}
	d.env = nodePreloadEnv(app, d.env, opt.NodePreload, d.out.warnf)
	switch {
	case opt.Limit != nil:
		d.limit = *opt.Limit
	case opt.CPUs == nil:
		if d.limit, err = cpuset.Read(); err != nil {
			return nil, fmt.Errorf("app %s: workers: %w", app.Name, err)
		}
	}
	if opt.CPUs != nil {
		d.limit.Allowed = opt.CPUs
	}
	if d.cpus = d.limit.Allowed; len(d.cpus) == 0 {
		return nil, fmt.Errorf("app %s: workers: no CPUs allowed", app.Name)
	}
	n := app.Workers.Count(d.limit.Count())
	if fixed := d.mode.fixedWorkers(); fixed.n > 0 && fixed.n != n {
		d.out.warnf("workers = %s means %d workers here, but there are %d %s: running %d (%s)",
			workersSetting(app.Workers), n, fixed.n, fixed.of, fixed.n, recountHint)
		n = fixed.n
	}
	if n < 1 {
		return nil, fmt.Errorf("app %s: %d workers", app.Name, n)
	}
	for i := range n {
		d.slots = append(d.slots, &slot{index: i, delay: app.Restart.Initial})
	}
	d.socks = listenerSocks(app, opt, d.out)
	return d, nil
}

// openOutput makes the writer of the worker lines and log lines for app,
// with its rate limit and, with opt.Journal, its journal sender.
func openOutput(app *appfile.App, opt Options) *output {
	stdout, stderr := opt.Stdout, opt.Stderr
	if stdout == nil {
		stdout = os.Stdout
	}
	if stderr == nil {
		stderr = os.Stderr
	}
	var jw *journal.Sender
	if opt.Journal {
		jw = journal.NewSender(opt.JournalSocket)
	}
	return newOutput(app.Name, stdout, stderr, jw, app.LogRateLimit, opt.Color && !opt.Journal)
}

// open acquires what the loop needs: /dev/null and the notify socket
// (the mode's sockets are the mode's: Run opens it after).
func (d *dispatcher) open() error {
	var err error
	if d.devnull, err = os.Open(os.DevNull); err != nil {
		return err
	}
	dir := d.opt.RuntimeDir
	if dir == "" {
		if rd := envValue(d.opt.Environ, "RUNTIME_DIRECTORY"); d.opt.Environ != nil && rd != "" {
			dir, _, _ = strings.Cut(rd, ":")
		} else if d.opt.Environ == nil && os.Getenv("RUNTIME_DIRECTORY") != "" {
			dir, _, _ = strings.Cut(os.Getenv("RUNTIME_DIRECTORY"), ":")
		}
	}
	if dir == "" {
		if dir, err = os.MkdirTemp("", "cohort-"); err != nil {
			return fmt.Errorf("runtime directory: %w", err)
		}
		d.tempDir = dir
	}
	d.notifyPath = filepath.Join(dir, notifyName(os.Getpid(), rand.Uint32()))
	if len(d.notifyPath) > 107 {
		return fmt.Errorf("notify socket path %s: longer than 107 bytes", d.notifyPath)
	}
	d.notify, err = notify.Listen(d.notifyPath)
	return err
}

// close releases what open acquired, after the goroutines that use it.
// It is called once every worker has been reaped.
func (d *dispatcher) close() {
	if d.notify != nil {
		d.notify.Close()
	}
	// Let output readers drain what the workers wrote last, but not wait
	// on a pipe that some escaped process still holds.
	d.readersMu.Lock()
	for f := range d.readers {
		f.SetReadDeadline(time.Now().Add(time.Second))
	}
	d.readersMu.Unlock()
	d.mode.close() // its goroutines end before d.wg's wait
	d.wg.Wait()
	d.closeCgroups(2 * time.Second)
	if d.devnull != nil {
		d.devnull.Close()
	}
	d.out.close()
	if d.out.jw != nil {
		d.out.jw.Close()
	}
	if d.tempDir != "" {
		os.RemoveAll(d.tempDir)
	}
}

// loop is the supervision loop: every signal, notify datagram, exec
// result and deadline becomes a call of transition here.
func (d *dispatcher) loop(ctx context.Context, sigs <-chan os.Signal) error {
	now := time.Now()
	d.started = now
	d.readyDeadline = now.Add(d.app.ReadyTimeout)
	if d.opt.Watchdog > 0 {
		d.wdNext = now.Add(d.opt.Watchdog / 2)
	}
	mode := string(d.app.Mode)
	ready := readyString(d.app.Ready)
	if d.app.Ready.Kind == appfile.ReadyListening {
		ready += fmt.Sprintf(" (settle %s)", d.app.ReadySettle)
	}
	d.out.infof("starting %d workers (%s mode, ready=%s, gen %d): %s", len(d.slots), mode, ready, d.gen, strings.Join(d.app.Command, " "))
	for _, s := range d.slots {
		d.spawn(s, now)
	}
	d.report(now)

	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	done := ctx.Done()
	for {
		select {
		case sig := <-sigs:
			d.onSignal(sig)
		case m := <-d.notifyCh:
			d.onNotify(m)
		case r := <-d.execCh:
			d.onExec(r)
		case m := <-d.probeCh:
			d.onProbe(m)
		case req := <-d.ctl.reqs:
			d.onControl(req, time.Now())
		case <-d.mode.faults():
			d.onModeFaults()
		case res := <-d.loadCh:
			d.onLoaded(res, time.Now())
		case p := <-d.fileCh:
			d.onFileProblem(p)
		case cs := <-d.samplerCauses():
			d.onRecycleCauses(cs)
		case <-timer.C:
		case <-done:
			done = nil
			if !d.stopping && !d.draining {
				d.shutdown("stop requested", time.Now())
			}
		}
		now := time.Now()
		d.fireDeadlines(now)
		d.stepReplace(now)
		d.report(now)
		// After report, which may have just sent the first READY=1: a
		// lifetime that came due before it must not wait for another
		// event (recycleWake leaves past times out).
		if d.stepRecycle(now) {
			d.report(now)
		}
		if d.stopping && len(d.procs) == 0 {
			d.out.infof("all workers ended")
			if d.opt.Subreaper {
				d.endOrphans(2 * time.Second)
			}
			return d.failed
		}
		timer.Reset(d.nextDeadline(now).Sub(now))
	}
}

// onSignal acts on a signal: SIGCHLD reaps, SIGHUP reloads, SIGTERM and
// SIGINT stop (a second one kills the workers at once).
func (d *dispatcher) onSignal(sig os.Signal) {
	switch sig {
	case syscall.SIGCHLD:
		d.reap()
	case syscall.SIGPIPE:
		// A write failed with EPIPE; the stream says so.
	case syscall.SIGHUP:
		d.startReload("SIGHUP", time.Now(), nil)
	default:
		if !d.stopping {
			d.shutdown(fmt.Sprintf("got %s", sig), time.Now())
			return
		}
		d.out.warnf("got %s again: killing the workers now", sig)
		for _, w := range d.procs {
			d.transition(w, trKill, 0)
		}
	}
}

// onExec acts on what a worker's exec-status pipe said.
func (d *dispatcher) onExec(r execResult) {
	w := d.procs[r.pid]
	switch {
	case w == nil:
	case r.err != "":
		d.out.warnf("worker %d (pid %d): %s", w.slot.index, w.pid, r.err)
	default:
		d.transition(w, trExeced, 0)
	}
}

// onFileProblem logs when the app file stops or starts validating again
// (p is its first problem, "" when it validates).
func (d *dispatcher) onFileProblem(p string) {
	if p != d.fileProblem {
		if p != "" {
			d.out.warnf("config: %s; running the last good configuration", p)
		} else {
			d.out.infof("config: %s validates again", d.opt.App.Path)
		}
	}
	d.fileProblem = p
}

// shutdown is a request to stop. With a drain delay ([metrics]
// drain_delay) the dispatcher drains first: /readyz answers 503 at once,
// so that load balancers polling it move traffic away, while the workers
// and listeners keep serving what still arrives; the graceful stop
// begins when the delay is over. Asked again while draining, it stops at
// once.
func (d *dispatcher) shutdown(why string, now time.Time) {
	delay := d.app.DrainDelay
	switch {
	case d.stopping:
	case d.draining:
		d.stop(why + " while draining")
	case delay > 0:
		d.draining, d.drainUntil, d.drainWhy = true, now.Add(delay), why
		d.abortReplace()
		d.out.infof("draining (%s): /readyz says 503; workers serve for drain_delay %s, then stop", why, delay)
		d.sendNotify("STOPPING=1")
		d.observe(Event{Kind: Draining, Worker: -1})
	default:
		d.stop(why)
	}
}

// stop begins the graceful stop: STOPPING=1, stop_signal to every worker.
func (d *dispatcher) stop(why string) {
	drained := d.draining
	d.draining = false
	d.stopping = true
	d.abortReplace()
	d.out.infof("stopping (%s): sending %s to %d workers, SIGKILL after %s", why, unix.SignalName(d.app.StopSignal), len(d.procs), d.app.StopTimeout)
	if !drained { // the drain said it
		d.sendNotify("STOPPING=1")
	}
	d.observe(Event{Kind: Stopping, Worker: -1})
	d.mode.stop()
	for _, s := range d.slots {
		s.restartAt = time.Time{}
	}
	for _, w := range d.procs {
		d.transition(w, trStop, 0)
	}
}

// reap collects every worker that has exited. Before a worker is reaped
// (while its pid cannot be reused) what is left of its process group is
// killed.
func (d *dispatcher) reap() {
	if d.opt.Subreaper {
		d.reapAll() // orphans.go
		return
	}
	for pid, w := range d.procs {
		var info unix.Siginfo
		if err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil); err != nil || info.Signo == 0 {
			continue
		}
		unix.Kill(-pid, unix.SIGKILL)
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		if err != nil || got != pid {
			continue
		}
		d.transition(w, trExited, ws)
	}
}

// onNotify attributes a datagram to its worker and acts on it.
func (d *dispatcher) onNotify(m notify.Datagram) {
	w := d.procs[m.PID]
	if w == nil {
		d.foreign++
		if d.foreign&(d.foreign-1) == 0 { // 1, 2, 4, 8…: log without flooding
			d.out.warnf("ignored a notify message from pid %d, which is no worker (%d so far)", m.PID, d.foreign)
		}
		d.observe(Event{Kind: ForeignNotify, Worker: -1, PID: m.PID, Foreign: d.foreign})
		return
	}
	if m.FDs > 0 {
		d.out.warnf("worker %d (pid %d) sent %d fds to the notify socket; closed them", w.slot.index, w.pid, m.FDs)
	}
	if m.Err != nil {
		d.out.warnf("worker %d (pid %d): %v", w.slot.index, w.pid, m.Err)
		return
	}
	n := m.Msg
	if n.HasStatus {
		w.status = n.Status
	}
	if n.Watchdog {
		d.transition(w, trWatchdogPing, 0)
	}
	if n.Ready {
		d.transition(w, trReadyMsg, 0)
	}
	if n.WatchdogTrigger {
		d.transition(w, trWatchdogTrigger, 0)
	}
	if n.Stopping {
		d.transition(w, trStopping, 0)
	}
}

// onModeFaults stops the workers that the mode says failed their
// connections (round-robin: a connection left unacknowledged for
// ack_timeout, a channel that ended or broke while it should serve): each
// is marked unhealthy and stopped, and its slot restarts it when it has
// exited.
func (d *dispatcher) onModeFaults() {
	d.reap() // a channel that ended often means the worker exited: say that instead
	serving := func(pid int) bool {
		w := d.procs[pid]
		return w != nil && (w.state == stStarting || w.state == stReady)
	}
	for _, f := range d.mode.takeFaults(serving) {
		w := d.procs[f.pid]
		if w == nil || d.stopping {
			continue
		}
		note := ""
		if f.note != "" {
			note = " (" + f.note + ")"
		}
		d.out.warnf("worker %d (pid %d) %s; stopping it%s", w.slot.index, w.pid, f.why, note)
		w.unhealthy, w.silent = f.why, f.silent
		d.transition(w, trUnhealthy, 0)
	}
}

func joinInts(ns []int) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = fmt.Sprint(n)
	}
	return strings.Join(s, ",")
}

// fireDeadlines feeds every due deadline to transition, refills slots
// whose backoff has elapsed and pings systemd's watchdog.
func (d *dispatcher) fireDeadlines(now time.Time) {
	for _, w := range d.procs {
		if !w.readyAt.IsZero() && !now.Before(w.readyAt) {
			w.readyAt = time.Time{}
			d.transition(w, trDelay, 0)
		}
		if !w.stableAt.IsZero() && !now.Before(w.stableAt) {
			w.stableAt = time.Time{}
			d.clearQuickExits(w)
		}
		if !w.deadline.IsZero() && !now.Before(w.deadline) {
			d.transition(w, trDeadline, 0)
		}
	}
	if !d.stopping {
		for _, s := range d.slots {
			if s.cur == nil && !s.restartAt.IsZero() && !now.Before(s.restartAt) {
				s.restartAt = time.Time{}
				d.spawn(s, now)
			}
		}
	}
	d.retryCgroups(now)
	if d.draining && !now.Before(d.drainUntil) {
		d.stop(fmt.Sprintf("%s; drain_delay %s over", d.drainWhy, d.app.DrainDelay))
	}
	if !d.wdNext.IsZero() && !now.Before(d.wdNext) {
		d.sendNotify("WATCHDOG=1")
		d.wdNext = now.Add(d.opt.Watchdog / 2)
	}
}

// clearQuickExits forgets the quick exits of w's slot once w, its current
// worker, has been up for min_uptime and is ready: its exit would no
// longer count as quick (scheduleRestart), so the slot is no longer crash
// looping, and the status line says so now rather than at the next exit.
// The backoff delay starts over as well, as it would at that exit.
func (d *dispatcher) clearQuickExits(w *worker) {
	s := w.slot
	if s.cur != w || w.state != stReady || s.quickExits == 0 {
		return
	}
	if s.crashLooping() {
		d.out.infof("worker %d (pid %d) up for min_uptime (%s) and ready: crash loop over", s.index, w.pid, d.app.Restart.MinUptime)
	}
	s.quickExits, s.delay = 0, d.app.Restart.Initial
}

// nextDeadline is when the loop must wake up next without an event.
func (d *dispatcher) nextDeadline(now time.Time) time.Time {
	next := now.Add(time.Hour)
	consider := func(t time.Time) {
		if !t.IsZero() && t.Before(next) {
			next = t
		}
	}
	for _, w := range d.procs {
		consider(w.readyAt)
		consider(w.deadline)
		consider(w.stableAt)
	}
	for _, s := range d.slots {
		consider(s.restartAt)
	}
	consider(d.wdNext)
	consider(d.cg.next)
	if d.draining {
		consider(d.drainUntil)
	}
	consider(d.recycleWake(now))
	if !d.sentReady && !d.stopping {
		consider(d.readyDeadline)
	}
	return next
}

// report sends READY=1 once the workers are ready and STATUS= whenever
// the status line changes.
func (d *dispatcher) report(now time.Time) {
	ready := d.readyCount()
	if d.opt.FailUnready && !d.sentReady && !d.stopping && ready == 0 && !now.Before(d.readyDeadline) {
		d.failed = fmt.Errorf("app %s: %w after ready_timeout (%s)", d.app.Name, ErrNotReady, d.app.ReadyTimeout)
		d.stop(fmt.Sprintf("no worker ready after ready_timeout %s", d.app.ReadyTimeout))
		return
	}
	var msgs []string
	if !d.sentReady && !d.stopping && !d.draining && ready > 0 {
		switch {
		case ready == len(d.slots):
			d.sentReady = true
			d.out.infof("all %d workers ready after %s", ready, now.Sub(d.started).Round(time.Millisecond))
		case !now.Before(d.readyDeadline):
			d.sentReady = true
			d.out.warnf("only %d of %d workers ready after ready_timeout (%s); reporting ready anyway", ready, len(d.slots), d.app.ReadyTimeout)
		}
		if d.sentReady {
			msgs = append(msgs, "READY=1")
		}
	}
	status := d.statusLine(now)
	if status != d.lastStatus {
		d.lastStatus = status
		msgs = append(msgs, "STATUS="+status)
	}
	if len(msgs) > 0 {
		d.sendNotify(strings.Join(msgs, "\n"))
	}
	if msgs != nil && msgs[0] == "READY=1" {
		d.observe(Event{Kind: Ready, Worker: -1})
	}
}

func (d *dispatcher) readyCount() int {
	n := 0
	for _, s := range d.slots {
		if s.cur != nil && s.cur.state == stReady {
			n++
		}
	}
	return n
}

// statusLine is the one line systemctl status shows, e.g.
// "4/4 workers ready · gen 1 · shared · 0 restarts".
func (d *dispatcher) statusLine(now time.Time) string {
	var b strings.Builder
	if d.stopping {
		fmt.Fprintf(&b, "stopping · %d workers left", len(d.procs))
		return b.String()
	}
	if d.draining {
		// Not a countdown: STATUS= is sent whenever the line changes.
		fmt.Fprintf(&b, "draining (/readyz 503) for drain_delay %s, then stopping · ", d.app.DrainDelay)
	}
	fmt.Fprintf(&b, "%d/%d workers ready · gen %d · %s · %d restart%s", d.readyCount(), len(d.slots), d.gen, d.app.Mode, d.restarts, plural(d.restarts))
	if n := d.rec.total; n > 0 {
		fmt.Fprintf(&b, " · %d recycle%s", n, plural(n))
	}
	b.WriteString(d.replaceStatus())
	b.WriteString(d.mode.status(len(d.slots)))
	var sick []int
	for _, w := range d.procs {
		if w.unhealthy != "" && !w.silent {
			sick = append(sick, w.slot.index)
		}
	}
	if len(sick) > 0 {
		slices.Sort(sick)
		sick = slices.Compact(sick)
		fmt.Fprintf(&b, " · unhealthy: worker%s %s", plural(len(sick)), joinInts(sick))
	}
	b.WriteString(d.appFileStatus())
	var looping []string
	for _, s := range d.slots {
		if s.crashLooping() {
			looping = append(looping, fmt.Sprint(s.index))
		}
	}
	if len(looping) > 0 {
		fmt.Fprintf(&b, " · crash loop: worker%s %s", plural(len(looping)), strings.Join(looping, ","))
	}
	return b.String()
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

func workersSetting(w appfile.Workers) string {
	if w.Auto {
		return `"auto"`
	}
	return fmt.Sprint(w.N)
}

func readyString(r appfile.Readiness) string {
	if r.Kind == appfile.ReadyDelay {
		return r.Delay.String()
	}
	return string(r.Kind)
}

func (d *dispatcher) sendNotify(state string) {
	if d.opt.Notify != nil {
		d.opt.Notify(state)
	}
}

func (d *dispatcher) observe(e Event) {
	if d.opt.Observe == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Restarts = d.restarts
	e.Status = d.lastStatus
	e.Serving = d.readyCount()
	d.opt.Observe(e)
}

// track registers a pipe read by a helper goroutine, so close can bound
// how long it waits for it; untrack is called by the goroutine when done.
func (d *dispatcher) track(f *os.File) {
	d.readersMu.Lock()
	d.readers[f] = struct{}{}
	d.readersMu.Unlock()
}

func (d *dispatcher) untrack(f *os.File) {
	d.readersMu.Lock()
	delete(d.readers, f)
	d.readersMu.Unlock()
}
