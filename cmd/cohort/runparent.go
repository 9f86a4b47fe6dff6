package main

import (
	"fmt"
	"os"
	"os/exec"
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
// The child runs in a process group of its own, so a Ctrl-C reaches it
// once, forwarded by the parent: SIGINT, SIGTERM, SIGHUP (reload) and
// SIGQUIT are passed on. The child's stdin, stdout and stderr are the
// parent's; the parent writes nothing after it started, and exits with
// the child's status (128+N when a signal N ended it).
func runParent(args []string) int {
	// PR_SET_PDEATHSIG fires when the thread that forked the child
	// exits: fork from this one and keep it.
	runtime.LockOSThread()
	if err := dispatcher.SetSubreaper(); err != nil {
		fmt.Fprintf(os.Stderr, "cohort run: %v (processes that escape the workers may survive a kill of the dispatcher)\n", err)
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGPIPE)
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
	cmd := exec.Command("/proc/self/exe", args...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), runChildEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "cohort run: %v\n", err)
		return 1
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
wait:
	for {
		select {
		case sig := <-sigs:
			if sig != syscall.SIGPIPE {
				cmd.Process.Signal(sig)
			}
		case <-done:
			break wait
		}
	}
	// The child is gone; whatever of its tree is left has been
	// reparented here.
	dispatcher.EndChildren(5 * time.Second)
	st := cmd.ProcessState
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return st.ExitCode()
}
