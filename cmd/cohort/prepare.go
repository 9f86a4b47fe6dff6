package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/generator/running"
)

// cmdDispatchPrepare is the units' ExecStartPre=+ (the main socket's and
// the service's) and the main socket's ExecStopPost=+: `cohort
// dispatch-prepare [--remove] FILE`. It runs as root and records the
// running configuration of the app (package running), which the
// dispatcher then runs and the generator renders a broken file's app
// from:
//
//   - FILE valid: it becomes the running configuration;
//   - FILE broken, the app has a running configuration: that one is kept,
//     the journal says "FILE:L:C: …; keeping the running configuration of
//     APP", and the start goes on (exit 0) with it;
//   - FILE broken and nothing recorded: the errors, exit 1 (the unit
//     fails to start and says why).
//
// --remove forgets the running configuration: the main socket stopped,
// so the app no longer runs, and a broken file is skipped at the next
// daemon-reload as at boot.
func cmdDispatchPrepare(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "dispatch-prepare", "[--remove] [--running-dir DIR] FILE",
		"Record an app's running configuration before its socket or service starts.\n"+
			"The generated units run this as root; people do not.")
	remove := fs.Bool("remove", false, "forget the running configuration (the app stopped)")
	dir := fs.String("running-dir", running.Dir, "where running configurations are recorded")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	path := fs.Arg(0)
	name := appfile.AppName(path)
	if err := appfile.CheckAppName(name); err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch-prepare: %s: %v\n", path, err)
		return 2
	}
	if *remove {
		if err := running.Remove(*dir, name); err != nil {
			fmt.Fprintf(env.stderr, "cohort dispatch-prepare: %v\n", err)
			return 1
		}
		return 0
	}
	data, _, err := running.ReadApp(path)
	if err == nil {
		if err := running.Write(*dir, name, data); err != nil {
			fmt.Fprintf(env.stderr, "cohort dispatch-prepare: %v\n", err)
			return 1
		}
		return 0
	}
	if _, kerr := running.Load(*dir, path); kerr == nil {
		fmt.Fprintln(env.stderr, running.KeepMessage(err, name))
		return 0
	} else if !errors.Is(kerr, running.ErrNone) {
		fmt.Fprintf(env.stderr, "cohort dispatch-prepare: %v\n", kerr)
	}
	fmt.Fprintln(env.stderr, err)
	fmt.Fprintf(env.stderr, "cohort dispatch-prepare: %s is broken and %s has no running configuration to keep; fix the file ('cohort check %s')\n", path, name, path)
	return 1
}
