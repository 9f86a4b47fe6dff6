// Command cohort runs, checks and inspects cohort apps: per-core worker
// clusters for programs in any language, supervised by systemd.
//
// systemd runs `cohort dispatch FILE` from the generated service; people run
// the other subcommands. `cohort help` lists them.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"
)

// command is one subcommand. run gets the arguments after the subcommand's
// name and returns the process exit code.
type command struct {
	summary string
	run     func(ctx context.Context, env *environment, args []string) int
}

// environment is what a subcommand may touch of the process, so tests can
// run subcommands in-process with their own streams.
type environment struct {
	stdout, stderr io.Writer
	// searchPath overrides the app-file search path (tests); nil means the
	// system one.
	searchPath []string
	// ownsChildren: every child of the process is the dispatcher's to
	// reap and kill (the real binary; not tests running subcommands
	// in-process), see dispatcher.Options.Subreaper.
	ownsChildren bool
	// runtimeRoot overrides where `cohort run` puts its apps' runtime
	// directories and status looks for them (tests); "" means the place
	// for this user (apps.go).
	runtimeRoot string
	// cgroupRoot overrides where check looks for the cgroup2 hierarchy
	// (tests); "" means /sys/fs/cgroup.
	cgroupRoot string
	// units overrides how status asks systemd about an app's units
	// (tests); nil means D-Bus.
	units func(ctx context.Context, app string) (service, socket unitState, err error)
	// initSystemd overrides how init asks systemd to reload and start
	// units (tests); nil means D-Bus.
	initSystemd initSystemd
	// journalctl overrides the journalctl that logs runs (tests); ""
	// means the one on PATH.
	journalctl string
}

func commands() map[string]command {
	return map[string]command{
		"check":            {"validate app files (default: every app on the search path)", cmdCheck},
		"generate":         {"render the units for app files, or write them into a directory", cmdGenerate},
		"version":          {"print cohort's version", cmdVersion},
		"run":              {"run an app in the foreground, binding its sockets itself", cmdRun},
		"status":           {"show an app's workers (pid, generation, state, uptime, restarts, memory, CPU); every app without APP", cmdStatus},
		"scale":            {"change the number of an app's workers until its next restart", cmdScale},
		"init":             {"write an app file for a command, check it and start the app under systemd", cmdInit},
		"signal":           {"send a signal to an app's workers (not the dispatcher) through its control socket", cmdSignal},
		"logs":             {"print the journal's lines of every app, or of one, labelled app.N; -f follows", cmdLogs},
		"monit":            {"a live terminal view of every app's workers, events and logs; keys reload, restart, scale", cmdMonit},
		"list":             {"list every app with the state of its systemd units (D-Bus)", cmdList},
		"reload":           {"rolling-restart an app's workers through systemd and wait for the result", cmdReload},
		"dispatch":         {"the dispatcher that a generated service runs (not for people)", cmdDispatch},
		"dispatch-reload":  {"the generated service's ExecReload=: reload the dispatcher and wait (not for people)", cmdDispatchReload},
		"dispatch-prepare": {"the generated units' ExecStartPre=: record the running configuration (not for people)", cmdDispatchPrepare},
	}
}

func main() {
	os.Exit(processMain(&environment{stdout: os.Stdout, stderr: os.Stderr, ownsChildren: true}))
}

// processMain is main for env, the whole process's environment (tests
// that run this binary set env.runtimeRoot).
func processMain(env *environment) int {
	if len(os.Args) > 1 && os.Args[1] == "run" && os.Getenv(runChildEnv) == "" {
		return runParent(os.Args[1:])
	}
	os.Unsetenv(runChildEnv)
	// Signals become a cancelled context here and nowhere else in this
	// binary, except where the dispatcher runs: it takes SIGINT and
	// SIGTERM itself (Options.HandleSignals), a first one to stop and a
	// second to kill, and a signal context as well made one SIGTERM count
	// twice (the workers got SIGKILL right after their SIGTERM).
	ctx := context.Background()
	if len(os.Args) < 2 || !runsDispatcher(os.Args[1]) {
		var stop context.CancelFunc
		ctx, stop = signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
		defer stop()
	}
	return runMain(ctx, env, os.Args[1:])
}

func runMain(ctx context.Context, env *environment, args []string) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(env.stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	if args[0] == "--version" {
		args[0] = "version"
	}
	cmd, ok := commands()[args[0]]
	if !ok {
		fmt.Fprintf(env.stderr, "cohort: unknown command %q (see 'cohort help')\n", args[0])
		return 2
	}
	return cmd.run(ctx, env, args[1:])
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: cohort COMMAND [ARGS…]\n\ncommands:")
	cmds := commands()
	names := make([]string, 0, len(cmds))
	for name := range cmds {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Fprintf(w, "  %-10s %s\n", name, cmds[name].summary)
	}
	fmt.Fprintln(w, "\n'cohort COMMAND --help' describes one command.")
}

// runsDispatcher says whether the command cmd runs a dispatcher, which
// handles its own signals: `dispatch`, and `run` (here its child: the
// parent only forwards them, runparent.go).
func runsDispatcher(cmd string) bool { return cmd == "dispatch" || cmd == "run" }
