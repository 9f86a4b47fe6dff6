// Package dispatcher is cohort's supervisor: it runs one app's workers,
// hands them the listening sockets, watches their readiness and liveness,
// restarts them with backoff, and reports the whole to systemd.
//
// One call to [Run] is the whole life of a dispatcher:
//
//	inherited, err := activation.Inherit() // what systemd passed
//	...
//	listeners, err := sockets.Match(app, inherited.TakeAll())
//	...
//	err = dispatcher.Run(ctx, dispatcher.Options{
//		App:           app,
//		Listeners:     listeners,
//		Notify:        func(s string) { _ = activation.Notify(s) },
//		HandleSignals: true,
//	})
//
// Run returns when the workers have all ended after a stop (SIGTERM, SIGINT
// or a cancelled context). Nothing it started outlives it: every goroutine
// is waited for, every worker is reaped, every fd it opened is closed.
//
// # What is here and what is not
//
// This package is the supervision: the state machine of the workers, the
// balancing of the modes, reloads, the control socket's commands, the
// orphan policy and the log relay. The plumbing that never touches the
// supervisor's state lives in small packages of its own, internal so that
// no user imports it; the rule is dispatcher/internal/ for what only the
// dispatcher uses, the module's internal/ for what cmd/ or the generator
// use too:
//
//   - internal/sockets binds the app's listening sockets (cohort run) and
//     matches the ones systemd passed to [[listen]] entries;
//   - dispatcher/internal/notify is the NOTIFY_SOCKET server and parser;
//   - internal/journal is cohort's one journald writer (the generator's
//     too);
//   - dispatcher/internal/envfile reads environment_file files, bounded;
//   - dispatcher/internal/procfs reads /proc (process trees, usage,
//     parents, children, environments) with the one /proc/PID/stat parser;
//     dispatcher/internal/probe tells from /proc whether a worker accepts;
//   - internal/cpuset reads and pins CPU sets.
//
// # Workers
//
// Each worker is a process started through a re-exec trampoline: the
// dispatcher forks /proc/self/exe with argv[1] = [TrampolineArg]; the
// trampoline sets LISTEN_PID (and WATCHDOG_PID) to its own pid, pins itself
// to a CPU when asked, and execs the app's command in place. The program
// therefore sees the standard socket-activation environment:
//
//   - fds 3.. are the app's listeners in [[listen]] order, with LISTEN_FDS,
//     LISTEN_FDNAMES and LISTEN_PID (its own pid) set;
//   - NOTIFY_SOCKET is the dispatcher's notify socket (see below);
//   - WATCHDOG_USEC/WATCHDOG_PID are set when the app has a watchdog;
//   - COHORT_APP, COHORT_WORKER (0-based index) and COHORT_GENERATION;
//   - COHORT_CPUS, the CPUs the service may use (cpuset.Limit's Count:
//     affinity, cgroup cpuset and CPU quota), the same for every worker:
//     what workers = "auto" counts, for sizing thread pools;
//   - everything else is the dispatcher's own environment (what systemd
//     gave the service, or the shell's for `cohort run`), without the
//     dispatcher's LISTEN_*, NOTIFY_SOCKET, WATCHDOG_*, JOURNAL_STREAM and
//     SYSTEMD_EXEC_PID, then the app's environment, then its
//     environment_file entries (last wins, as in systemd).
//
// stdin is /dev/null; stdout and stderr share one pipe read by the
// dispatcher line by line, so output is never interleaved mid-line.
//
// Each worker leads its own process group. stop_signal goes to the whole
// group (kill_mode = "group", systemd's KillMode=control-group for one
// worker) or to the worker's main process only (kill_mode = "mixed", so
// that a master such as gunicorn's stops its children itself); the final
// SIGKILL goes to the group in both modes, and whatever is left of a
// group when its leader exits is killed, so a worker's children never
// outlive it. The exit line names a signal that cohort sent ("stopped
// (SIGTERM sent by cohort)"), so a requested stop never reads as a crash. Workers get
// PR_SET_PDEATHSIG=SIGKILL, set from the one OS thread that forks them all,
// so they die with the dispatcher.
//
// # Readiness and notify
//
// All workers share one notify socket (in $RUNTIME_DIRECTORY, else a
// private temporary directory) with SO_PASSCRED: a datagram is attributed
// to a worker by the sender's pid, which the kernel vouches for. Datagrams
// from any other pid, including a worker's own children, are ignored and
// counted (systemd's NotifyAccess=main). Fds sent along are closed.
// READY=1, STATUS=, WATCHDOG=1, WATCHDOG=trigger and STOPPING=1 are
// understood; other assignments are ignored.
//
// # The state machine
//
// Each worker process goes starting → ready → draining → exited; the
// transitions are all in one method (dispatcher.transition). A slot (worker
// index) whose process exited is refilled after a backoff delay that
// doubles from Restart.Initial up to Restart.Max and is reset by a worker
// that ran at least Restart.MinUptime.
//
// # Recycling
//
// With a [recycle] table, a ready worker that is over its memory
// threshold, has run max_lifetime (+ jitter) or, in round-robin mode,
// was handed max_connections (+ jitter) is replaced the way
// restart-worker replaces one: the new worker is ready before the old
// one drains. One recycle runs at a time, min_interval apart, and never
// during a reload (recycle.go). Memory is sampled off the loop through a
// memoryReader: each worker's cgroup's memory.current and memory.high
// crossings when the workers have cgroups with the memory controller
// (cgroupMemory, set up by openCgroups), else its process-tree RSS.
//
// # Cgroups
//
// With Options.Cgroups every worker runs in a cgroup of its own, beside
// the dispatcher's leaf "supervisor": the service's delegated subtree
// under systemd, cohort run's own where it has one (cgroups.go). Its
// [limits] are written there before it starts; stopping or killing it
// kills the cgroup (cgroup.kill), so nothing it forked survives it; status
// reads memory.current, cpu.stat, memory.events and PSI from it.
//
// # Modes
//
// The three modes are one interface (mode.go): the supervisor calls its
// mode when a worker is forked (which fds and variables it gets), becomes
// ready, drains, exits, and for its part of the status line, its CONNS
// and its faults; it never asks which mode it runs.
//
// # Round-robin mode
//
// With mode = "round-robin" the dispatcher accepts the connections itself
// (one goroutine per listener, accept4 until EAGAIN on the listener's
// RawConn) and hands them to the ready workers in turn, or to the one with
// the fewest open connections (balance = "least-connections"), over one
// activation/rr channel per worker: fd 3 of the worker, named "cohort-rr",
// with COHORT_RR_LISTENERS naming the listeners. A worker with max_pending
// connections it has not acknowledged is skipped; when all are, accepting
// stops and the kernel's backlog holds the rest. Connections a worker
// rejects, or had not acknowledged when it died or closed its channel
// (draining), go to another worker. The dispatcher never reads from a
// connection. See internal/balance (the balancer) and docs/protocol.md.
//
// # Reuseport mode
//
// With mode = "reuseport" systemd binds one SO_REUSEPORT socket per
// listener and worker slot (Options.SlotListeners, matched by
// sockets.MatchSlots from the "<listener>.<slot>" fd names the generator
// gives them), and worker i is forked with only slot i's sockets, under
// the listeners' plain names. The dispatcher holds them all for its whole
// life: a slot whose worker died or is being replaced keeps its socket and
// its queue. The number of slots is the number of socket sets, whatever
// the file says (with a warning), for a reload and for scale too.
package dispatcher
