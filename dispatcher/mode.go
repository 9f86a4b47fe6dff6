package dispatcher

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/internal/probe"
	"golang.org/x/sys/unix"
)

// A mode is how workers get their connections: shared (every worker gets
// the listeners and accepts on them), reuseport (worker i gets slot i's
// own SO_REUSEPORT sockets) or round-robin (the dispatcher accepts and
// hands connections over a channel per worker: roundrobin.go,
// internal/balance). The supervisor holds one mode, made by newMode, and
// calls it at fixed points of each worker's life; it never asks which
// mode it has.
//
// Every method is called from the supervision loop (open and close from
// Run) and must not block it.
type mode interface {
	// open acquires what the mode needs to run (the sockets' blocking
	// mode, the balancer and its goroutines, which end with ctx or
	// close) for workers workers at first. It is called once, before the
	// first worker starts.
	open(ctx context.Context, workers int) error
	// start prepares the fork of slot's next worker: its fds, their
	// names and the environment that goes with them. When it returns
	// without error, the caller forks and then calls the start's forked
	// once, with the pid (0 when the fork failed).
	start(slot int) (workerStart, error)
	// ready: the worker pid has reached state ready.
	ready(pid int)
	// drain: the worker pid leaves service, before it is sent its stop
	// signal: it gets nothing new. retiring says the supervisor retires
	// it (reload, restart-worker, scale); otherwise it is stopping for
	// its own reasons or with the dispatcher. May be called more than
	// once.
	drain(pid int, retiring bool)
	// exited: the worker pid has been reaped.
	exited(pid int)
	// stop: the dispatcher stops; no worker gets anything new.
	stop()
	// status is the mode's part of the status line, "" or " · …", for
	// the slots 0 to slots-1.
	status(slots int) string
	// conns is what status shows of pid's connections (CONNS): how many
	// were handed to it and how many it holds; zeros where the mode does
	// not hand connections.
	conns(pid int) (handed uint64, open int)
	// accepted is how many connections the dispatcher accepted on each
	// listener ([[listen]] order); nil where the workers accept.
	accepted() []uint64
	// faults is ready when takeFaults may have something; nil (never
	// ready) for modes without faults.
	faults() <-chan struct{}
	// takeFaults returns the workers whose connections failed (round-
	// robin: a channel not acknowledged or broken) among those for which
	// serving (starting or ready) is true; the supervisor stops them.
	// The supervisor reaps before it asks.
	takeFaults(serving func(pid int) bool) []modeFault
	// fixedWorkers is the number of workers the mode imposes (0: any).
	fixedWorkers() fixedCount
	// close releases what open acquired; it is called once every worker
	// has been reaped, also when open failed or was never called.
	close()
}

var (
	_ mode = (*socketMode)(nil)
	_ mode = (*roundRobin)(nil)
)

// workerStart is what a mode gives one worker being forked.
type workerStart struct {
	args  forkArgs      // its fds and the environment that goes with them
	probe probe.Targets // what ready = "listening" watches for it
	// forked is called once after the fork with the pid, 0 when the fork
	// failed; nil when the mode has nothing to do then.
	forked func(pid int)
}

// forkArgs is what fork gives one worker beyond the generation's spec:
// what its mode returned, and what per-worker placement adds.
type forkArgs struct {
	fds   []uintptr // placed at fds 3.. in order, counted by LISTEN_FDS
	names string    // LISTEN_FDNAMES for them
	env   []string  // more variables, after LISTEN_*

	// cgroup, when set, is the cgroup directory the worker starts in
	// (clone3 with CLONE_INTO_CGROUP, before it runs a single
	// instruction): its own (cgroups.go), which spawn adds next to the
	// mode's start.
	cgroup *os.File
	// cgroupPath is, where clone3 is refused, that cgroup's directory:
	// the trampoline moves itself in before it execs the command.
	cgroupPath string
}

// sysProcAttr is what the fork of a needs from the kernel.
func (a forkArgs) sysProcAttr() *syscall.SysProcAttr {
	sys := &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if a.cgroup != nil {
		sys.UseCgroupFD, sys.CgroupFD = true, int(a.cgroup.Fd())
	}
	return sys
}

// modeFault is a worker its mode wants replaced.
type modeFault struct {
	pid    int
	why    string // for the log and status
	silent bool   // it never spoke the mode's protocol: its exit is a failed start
	note   string // what becomes of its connections, for the log ("" for nothing)
}

// fixedCount is a number of workers a mode imposes.
type fixedCount struct {
	n   int    // 0: any number of workers can run
	of  string // what there are n of: "reuseport socket sets"
	why string // "reuseport mode runs one worker per socket set"
}

// newMode checks opt's sockets against app's mode and returns the mode,
// not yet open. It is the only place that looks at app.Mode.
func newMode(app *appfile.App, opt Options, out *output) (mode, error) {
	names := make([]string, len(app.Listen))
	for i, l := range app.Listen {
		names[i] = l.Name
	}
	switch app.Mode {
	case appfile.ModeShared, appfile.ModeRoundRobin:
		if len(opt.Listeners) != len(app.Listen) {
			return nil, fmt.Errorf("app %s: %d listening sockets for %d [[listen]] entries", app.Name, len(opt.Listeners), len(app.Listen))
		}
		if app.Mode == appfile.ModeRoundRobin {
			return newRoundRobin(app, opt.Listeners, names, out), nil
		}
		return &socketMode{sets: [][]*os.File{opt.Listeners}, names: strings.Join(names, ":")}, nil
	case appfile.ModeReusePort:
		if len(opt.SlotListeners) == 0 || len(app.Listen) == 0 {
			return nil, fmt.Errorf("app %s: reuseport mode: no listening sockets", app.Name)
		}
		for i, ls := range opt.SlotListeners {
			if len(ls) != len(app.Listen) {
				return nil, fmt.Errorf("app %s: reuseport mode: worker %d has %d listening sockets for %d [[listen]] entries", app.Name, i, len(ls), len(app.Listen))
			}
		}
		return &socketMode{sets: opt.SlotListeners, perSlot: true, names: strings.Join(names, ":")}, nil
	}
	return nil, fmt.Errorf("app %s: mode %q: %w (only %q, %q and %q)", app.Name, app.Mode, errUnknownMode, appfile.ModeShared, appfile.ModeRoundRobin, appfile.ModeReusePort)
}

// socketMode is shared mode (one set, every worker gets it) and reuseport
// mode (perSlot: worker i gets set i). The workers accept on their own,
// so a worker's life changes nothing here: in shared mode a worker
// stops accepting when it gets stop_signal, and in reuseport mode a
// slot's sockets stay open while its workers come and go, so what the
// kernel steers to a slot whose worker is being replaced waits in its
// queue.
type socketMode struct {
	sets    [][]*os.File // the caller's (Options); never closed here
	perSlot bool
	names   string // LISTEN_FDNAMES

	fds   [][]uintptr // set i's fds, in blocking mode
	ino   [][]uint64  // their socket inodes, for ready = "listening"
	ports []string    // their ListenPortsEnv values
}

// open puts the sockets in blocking mode (workers share their file
// description, and expect what systemd passes) and notes their inodes.
func (m *socketMode) open(context.Context, int) error {
	for _, set := range m.sets {
		fds := make([]uintptr, len(set))
		for i, f := range set {
			fds[i] = f.Fd()
			if err := unix.SetNonblock(int(fds[i]), false); err != nil {
				return fmt.Errorf("listener %s: set blocking: %w", f.Name(), err)
			}
		}
		ino, err := inodes(fds)
		if err != nil {
			return err
		}
		ports, err := listenPorts(fds)
		if err != nil {
			return err
		}
		m.fds, m.ino, m.ports = append(m.fds, fds), append(m.ino, ino), append(m.ports, ports)
	}
	return nil
}

func (m *socketMode) start(slot int) (workerStart, error) {
	i := 0
	if m.perSlot {
		i = slot
	}
	return workerStart{
		args:  forkArgs{fds: m.fds[i], names: m.names, env: []string{ListenPortsEnv + "=" + m.ports[i]}},
		probe: probe.Targets{Inodes: m.ino[i]},
	}, nil
}

func (m *socketMode) ready(int)                                 {}
func (m *socketMode) drain(int, bool)                           {}
func (m *socketMode) exited(int)                                {}
func (m *socketMode) stop()                                     {}
func (m *socketMode) status(int) string                         { return "" }
func (m *socketMode) conns(int) (uint64, int)                   { return 0, 0 }
func (m *socketMode) accepted() []uint64                        { return nil }
func (m *socketMode) faults() <-chan struct{}                   { return nil }
func (m *socketMode) takeFaults(func(pid int) bool) []modeFault { return nil }
func (m *socketMode) close()                                    {}

func (m *socketMode) fixedWorkers() fixedCount {
	if !m.perSlot {
		return fixedCount{}
	}
	// A socket without a worker would hold its share of the connections
	// forever, and a worker without a socket of its own has nothing to
	// accept: one worker per socket set.
	return fixedCount{n: len(m.sets), of: "reuseport socket sets", why: "reuseport mode runs one worker per socket set"}
}
