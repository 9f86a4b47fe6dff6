package main

import (
	"context"
	"fmt"

	"github.com/cohort-dev/cohort/dispatcher"
	"github.com/cohort-dev/cohort/generator/config"
	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/coreos/go-systemd/v22/journal"
)

// cmdDispatch is what a generated service runs: `cohort dispatch FILE`.
// It takes the sockets systemd passed (LISTEN_FDS), matches them to the
// app's [[listen]] entries by name, and supervises the workers until
// systemd stops the service. Worker output goes to the journal with
// COHORT_WORKER/COHORT_PID/COHORT_GENERATION fields when stderr is a
// journal stream.
func cmdDispatch(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "dispatch", "FILE",
		"Run an app's workers on the sockets systemd passed. The generated service runs this; people use 'cohort run'.")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	app, err := config.ParseFile(fs.Arg(0))
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch: %v\n", err)
		return 1
	}
	// Unset LISTEN_*: the dispatcher's own sockets are no business of the
	// workers (Run filters them out of their environment anyway).
	files := activation.Files(true)
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	opts := dispatcher.Options{
		App:           app,
		Stdout:        env.stdout,
		Stderr:        env.stderr,
		Notify:        sdNotify,
		HandleSignals: true,
		Subreaper:     env.ownsChildren,
	}
	if app.Mode == config.ModeReusePort {
		opts.SlotListeners, err = dispatcher.MatchSlotListeners(app, files)
	} else {
		opts.Listeners, err = dispatcher.MatchListeners(app, files)
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch: %v\n", err)
		return 1
	}
	watchdog, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch: watchdog: %v (ignored)\n", err)
	}
	opts.Journal, _ = journal.StderrIsJournalStream()
	opts.Watchdog = watchdog
	err = dispatcher.Run(ctx, opts)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch: %v\n", err)
		return 1
	}
	return 0
}

// sdNotify sends state to $NOTIFY_SOCKET; without one (cohort run outside
// systemd) it does nothing. Notification is best effort.
func sdNotify(state string) {
	daemon.SdNotify(false, state)
}
