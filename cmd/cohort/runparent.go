package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher"
	"github.com/cohort-dev/cohort/internal/cgroup"
)

// runChildEnv marks the `cohort run` process that does the work; the
// process the user started is its parent (runParent).
const runChildEnv = "COHORT_RUN_CHILD"

// runParent is `cohort run` as the user started it. After a kill -9 of
// the dispatcher, PR_SET_PDEATHSIG takes its workers along, but not what
// they started: the node that `npm start` or `sh -c` runs, a setsid
// daemon. So the pid the user sees is a small parent, like tini or
// dumb-init, that runs the real `cohort run` as its child and outlives
// it:
//
//   - kill -9 of the parent: the child gets SIGTERM (PR_SET_PDEATHSIG)
//     and stops as on Ctrl-C: stop_signal, stop_timeout, SIGKILL, and
//     kills what its workers left (it is a subreaper, see
//     dispatcher.Options.Subreaper);
//   - kill -9 of the child: its workers die (PR_SET_PDEATHSIG), and what
//     they started is reparented to the parent, a subreaper too, which
//     kills it all once the child has exited.
//
// As PID 1 of a container (docker, podman, Kubernetes, systemd-nspawn
// without --boot) the parent is the namespace's init: every process
// orphaned in the container is reparented to it, not only the
// dispatcher's. Those are mostly left by `docker exec`/`kubectl exec`
// sessions (the dispatcher, a subreaper, is the nearer reaper of
// everything its workers leave). So the parent reaps any child of its
// own, any time, with wait4(-1) — which can never take a worker's exit
// status from the dispatcher: workers are the child's children, not the
// parent's. That is the reason for the split (tini's), rather than one
// process that is both init and supervisor, where a wait4(-1) would race
// the supervisor's own waits. Orphans are only reaped while the child
// runs, not killed: they are not cohort's; once the child has exited,
// whatever is left is killed (the container ends anyway). Outside a
// container the same code runs: as a subreaper the parent gets orphans
// only after the child has died, and reaping them at once is right
// there too.
//
// The child runs in a process group of its own, so a Ctrl-C reaches it
// once, forwarded by the parent: SIGINT, SIGTERM, SIGHUP (reload) and
// SIGQUIT are passed on (as PID 1, a signal without a handler would be
// dropped by the kernel; these have one). The child's stdin, stdout and
// stderr are the parent's; the parent writes nothing after it started,
// and exits with the child's status (128+N when a signal N ended it).
func runParent(args []string) int {
	// PR_SET_PDEATHSIG fires when the thread that forked the child
	// exits: fork from this one and keep it.
	runtime.LockOSThread()
	if err := dispatcher.SetSubreaper(); err != nil {
		fmt.Fprintf(os.Stderr, "cohort run: %v (processes that escape the workers may survive a kill of the dispatcher)\n", err)
	}
	// SIGCHLD before the fork, so that no exit goes unnoticed.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGCHLD, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGPIPE)
	defer signal.Stop(sigs)

	// Alone in a cgroup it may write (a container's own cgroup
	// namespace): into its leaf before the dispatcher starts, so that
	// the dispatcher, in it too, can give its workers cgroups beside it
	// (dispatcher.Options.Cgroups); back out once it has ended. Anywhere
	// else the dispatcher says why workers share its cgroup.
	if self, err := cgroup.Self(); err == nil && filepath.Base(self) != appfile.SupervisorCgroup {
		if leaf, err := cgroup.EnterLeaf(self, appfile.SupervisorCgroup); err == nil {
			defer func() {
				if err := cgroup.LeaveLeaf(leaf); err != nil {
					fmt.Fprintf(os.Stderr, "cohort run: %v\n", err)
				}
			}()
		}
	}
	// syscall.ForkExec rather than os/exec: the child is reaped by the
	// wait4(-1) below, and an exec.Cmd (or os.Process, with its pidfd)
	// would wait for it a second time.
	argv := append([]string{os.Args[0]}, args...)
	child, err := syscall.ForkExec("/proc/self/exe", argv, &syscall.ProcAttr{
		Env:   append(os.Environ(), runChildEnv+"=1"),
		Files: []uintptr{0, 1, 2},
		Sys:   &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "cohort run: start the dispatcher: %v\n", err)
		return 1
	}
	var status syscall.WaitStatus
	for {
		ws, done := reapChildren(child)
		if done {
			status = ws
			break
		}
		switch sig := <-sigs; sig {
		case syscall.SIGCHLD, syscall.SIGPIPE:
		default:
			syscall.Kill(child, sig.(syscall.Signal))
		}
	}
	// The child is gone; whatever of its tree is left has been
	// reparented here.
	dispatcher.EndChildren(5 * time.Second)
	if status.Signaled() {
		return 128 + int(status.Signal())
	}
	return status.ExitStatus()
}

// reapChildren reaps every child of the process that has exited, without
// waiting; done is true, with its status, once child is among them.
func reapChildren(child int) (status syscall.WaitStatus, done bool) {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		switch {
		case errors.Is(err, syscall.EINTR):
			continue
		case err != nil || pid <= 0: // ECHILD, or none has exited
			return status, done
		case pid == child:
			status, done = ws, true
		}
	}
}
