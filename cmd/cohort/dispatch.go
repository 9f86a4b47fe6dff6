package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/cohort-dev/cohort/activation"
	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher"
	"github.com/cohort-dev/cohort/generator/running"
	"github.com/cohort-dev/cohort/internal/sockets"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/coreos/go-systemd/v22/journal"
)

// cmdDispatch is what a generated service runs: `cohort dispatch FILE`.
// It takes the sockets systemd passed (LISTEN_FDS), matches them to the
// app's [[listen]] entries by name, and supervises the workers until
// systemd stops the service. Worker output goes to the journal with
// COHORT_WORKER/COHORT_PID/COHORT_GENERATION fields when stderr is a
// journal stream.
//
// The app is its running configuration (package running), which the
// service's ExecStartPre=+ recorded as root: exactly what root validated,
// even when FILE has been edited (or broken) since; reloads take the
// configuration that dispatch-reload validated. FILE still names the app
// in messages and is watched so that STATUS= says when it is broken.
// Without a recorded configuration (units of an older cohort) FILE is
// read.
func cmdDispatch(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "dispatch", "FILE",
		"Run an app's workers on the sockets systemd passed. The generated service runs this; people use 'cohort run'.")
	dir := fs.String("running-dir", running.Dir, "where the units record the running configuration")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	path := fs.Arg(0)
	app, err := loadRunning(*dir, path, running.Load)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch: %v\n", err)
		return 1
	}
	// cohort's own reader, not go-systemd's activation.Files: it refuses a
	// malformed LISTEN_PID/LISTEN_FDS or a listed fd that is not open
	// (go-systemd's quietly returns no sockets), and it unsets LISTEN_* (the
	// dispatcher's own sockets are no business of the workers; Run filters
	// them out of their environment anyway).
	inherited, err := activation.Inherit()
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch: %v\n", err)
		return 1
	}
	files := inherited.TakeAll()
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
		// A cgroup per worker in the service's delegated subtree
		// (Delegate=yes); the whole process moves, so only when it is
		// the dispatcher's own.
		Cgroups: env.ownsChildren,
		Load:    func() (*appfile.App, error) { return loadRunning(*dir, path, running.LoadCandidate) },
	}
	// The metrics socket is a unit of its own (APP-cohort-metrics.socket);
	// without it (units generated before [metrics] was added, until
	// daemon-reload) the app runs and says so.
	metrics, appFiles := sockets.TakeMetrics(files)
	switch {
	case app.Metrics.On() && metrics == nil:
		fmt.Fprintf(env.stderr, "cohort dispatch: [metrics] listen = %q, but systemd passed no %q socket: /metrics, /readyz and /livez will not answer (run 'systemctl daemon-reload', then 'systemctl restart %s.socket')\n", app.Metrics.Listen.Address, appfile.MetricsFDName, app.Name)
	case !app.Metrics.On() && metrics != nil:
		metrics = nil // passed by units of an earlier configuration: not served
	}
	opts.Metrics = metrics
	if app.Mode == appfile.ModeReusePort {
		opts.SlotListeners, err = sockets.MatchSlots(app, appFiles)
	} else {
		opts.Listeners, err = sockets.Match(app, appFiles)
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

// loadRunning loads the app of path with load (running.Load or
// LoadCandidate) from the running configurations in dir, or reads path
// when none is recorded.
func loadRunning(dir, path string, load func(dir, path string) (*appfile.App, error)) (*appfile.App, error) {
	app, err := load(dir, path)
	if errors.Is(err, running.ErrNone) {
		return appfile.ParseFile(path)
	}
	return app, err
}

// sdNotify sends state to $NOTIFY_SOCKET; without one (cohort run outside
// systemd) it does nothing. Notification is best effort: a manager that
// does not read its socket costs at most activation.Notify's deadline, and
// the error has nobody to go to.
func sdNotify(state string) {
	_ = activation.Notify(state)
}
