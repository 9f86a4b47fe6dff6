package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cohort-dev/cohort/dispatcher/control"
)

// cmdSignal is `cohort signal`: PM2's sendSignal, through the control
// socket, so that the dispatcher (which `systemctl kill -s` would hit
// too) is never the target and a worker is signalled only while it is
// the dispatcher's unreaped child.
func cmdSignal(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "signal", "[--worker N] [--socket PATH] APP SIGNAL",
		"Send SIGNAL (USR2, SIGHUP, …: a name) to the main process of each of\n"+
			"APP's workers, or of worker N only; never to the dispatcher. The\n"+
			"program handles it (Node: process.on('SIGUSR2', …)); one that ends\n"+
			"or stops a worker is seen by the dispatcher like any other exit.")
	worker := fs.Int("worker", -1, "the worker `N` (its index, as in 'cohort status') only")
	socket := fs.String("socket", "", "the control socket (default: the app's, see cohort(1))")
	// APP SIGNAL may come before the options.
	pos, code, done := parseLeading(fs, args)
	if done {
		return code
	}
	if len(pos) != 2 {
		fs.Usage()
		return 2
	}
	app, name := pos[0], pos[1]
	sig, err := control.SignalByName(name)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort signal: %v\n", err)
		return 2
	}
	req := control.Request{Cmd: control.CmdSignal, Signal: name}
	if *worker >= 0 {
		req.Worker = worker
	}
	path, err := env.controlTarget(app, *socket)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort signal: %v\n", err)
		return 2
	}
	rep, err := control.Call(ctx, path, req)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort signal %s: %s\n", app, env.diagnose(ctx, app, *socket != "", err).text)
		return 1
	}
	pids := make([]string, len(rep.PIDs))
	for i, p := range rep.PIDs {
		pids[i] = strconv.Itoa(p)
	}
	fmt.Fprintf(env.stdout, "%s: sent %s to %d worker process(es): %s\n", app, unix.SignalName(sig), len(pids), strings.Join(pids, " "))
	return 0
}
