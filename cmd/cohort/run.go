package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/dispatcher"
	"github.com/cohort-dev/cohort/generator/config"
)

const runArgs = `[OPTIONS] FILE.toml
       cohort run --listen [NAME=]ADDRESS [--listen …] [OPTIONS] -- COMMAND [ARGS…]`

const runAbout = `Run an app in the foreground, binding its sockets itself (like
systemd-socket-activate) and supervising its workers as the service would:
worker output is printed with an "[app.N]" prefix, Ctrl-C stops the workers
gracefully (a second Ctrl-C kills them). Options override the file.`

// cmdRun is `cohort run`: the dispatcher in the foreground, with
// listeners it binds itself.
func cmdRun(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "run", runArgs, runAbout)
	var listens listFlag
	fs.Var(&listens, "listen", "a socket to listen on, `[NAME=]ADDRESS` (host:port, [v6]:port, /path.sock, @abstract); repeatable")
	workers := fs.String("workers", "", "`N` or \"auto\" (one per CPU); default: the file's, else auto")
	mode := fs.String("mode", "", "\"shared\" (default), \"round-robin\" or \"reuseport\"")
	ready := fs.String("ready", "", "`WHEN` a worker counts as ready: notify, exec or a duration")
	name := fs.String("name", "", "the app's name in output and COHORT_APP (default: the file's or the command's base name)")
	affinity := fs.Bool("cpu-affinity", false, "pin worker i to the i-th CPU this process may run on")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })

	app, err := runApp(fs.Args(), listens)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
		return 2
	}
	if err := applyRunFlags(app, set, *workers, *mode, *ready, *name, *affinity); err != nil {
		fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
		return 2
	}

	opts := dispatcher.Options{App: app, Stdout: env.stdout, Stderr: env.stderr, Notify: sdNotify, HandleSignals: true, Subreaper: env.ownsChildren}
	if app.Mode == config.ModeReusePort {
		cpus, err := dispatcher.AllowedCPUs()
		if err != nil {
			fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
			return 1
		}
		n := app.Workers.Count(len(cpus))
		if opts.SlotListeners, err = dispatcher.BindSlots(app, n); err != nil {
			fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
			return 1
		}
		defer closeAll(opts.SlotListeners...)
		for i, f := range opts.SlotListeners[0] {
			fmt.Fprintf(env.stderr, "[%s] listening on %s (%s, %d reuseport sockets)\n", app.Name, listenAddr(f, app.Listen[i].Address), app.Listen[i].Name, n)
		}
	} else {
		files, cleanup, err := dispatcher.Bind(app)
		if err != nil {
			fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
			return 1
		}
		defer cleanup()
		defer closeAll(files)
		for i, f := range files {
			fmt.Fprintf(env.stderr, "[%s] listening on %s (%s)\n", app.Name, listenAddr(f, app.Listen[i].Address), app.Listen[i].Name)
		}
		opts.Listeners = files
	}
	// A reload (SIGHUP, or the control socket) re-reads the file and
	// applies the same flags again.
	load := func() (*config.App, error) {
		a, err := runApp(fs.Args(), listens)
		if err == nil {
			err = applyRunFlags(a, set, *workers, *mode, *ready, *name, *affinity)
		}
		return a, err
	}
	opts.Load = load
	err = dispatcher.Run(ctx, opts)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
		return 1
	}
	return 0
}

// runApp builds the app from FILE.toml, or from --listen flags and a
// command after "--".
func runApp(args []string, listens listFlag) (*config.App, error) {
	if len(listens) == 0 {
		if len(args) != 1 {
			return nil, fmt.Errorf("want FILE.toml, or --listen ADDRESS -- COMMAND (see 'cohort run --help')")
		}
		return config.ParseFile(args[0])
	}
	if len(args) == 0 {
		return nil, fmt.Errorf("--listen needs a command: cohort run --listen %s -- COMMAND [ARGS…]", listens[0])
	}
	app := config.New(filepath.Base(args[0]))
	app.Command = args
	seen := map[string]bool{}
	for i, l := range listens {
		name, addr, ok := strings.Cut(l, "=")
		if !ok {
			name, addr = "listen"+strconv.Itoa(i), l
		}
		if seen[name] {
			return nil, fmt.Errorf("--listen %s: name %q used twice", l, name)
		}
		seen[name] = true
		kind, hint, err := config.ParseAddress(addr)
		switch {
		case err == nil:
		case strings.HasPrefix(addr, "localhost:") && hint != "":
			addr, kind = hint, config.ListenTCP
		case strings.HasSuffix(addr, ":0"): // any free port, printed at start
			kind = config.ListenTCP
		default:
			return nil, fmt.Errorf("--listen %s: %v", l, err)
		}
		app.Listen = append(app.Listen, config.Listener{Name: name, Address: addr, Kind: kind})
	}
	return app, nil
}

func applyRunFlags(app *config.App, set map[string]bool, workers, mode, ready, name string, affinity bool) error {
	if set["workers"] {
		if workers == "auto" {
			app.Workers = config.Workers{Auto: true}
		} else {
			n, err := strconv.Atoi(workers)
			if err != nil || n < 1 || n > config.MaxWorkers {
				return fmt.Errorf("--workers %q: want \"auto\" or 1 to %d", workers, config.MaxWorkers)
			}
			app.Workers = config.Workers{N: n}
		}
	}
	if set["mode"] {
		switch m := config.Mode(mode); m {
		case config.ModeShared, config.ModeRoundRobin, config.ModeReusePort:
			app.Mode = m
		default:
			return fmt.Errorf("--mode %q: want %q, %q or %q", mode, config.ModeShared, config.ModeRoundRobin, config.ModeReusePort)
		}
	}
	if set["ready"] {
		switch ready {
		case "notify":
			app.Ready = config.Readiness{Kind: config.ReadyNotify}
		case "exec":
			app.Ready = config.Readiness{Kind: config.ReadyExec}
		default:
			d, err := config.ParseDuration(ready)
			if err != nil {
				return fmt.Errorf("--ready %q: want notify, exec or a duration: %v", ready, err)
			}
			app.Ready = config.Readiness{Kind: config.ReadyDelay, Delay: d}
		}
	}
	if set["name"] {
		if err := config.CheckAppName(name); err != nil {
			return fmt.Errorf("--name: %v", err)
		}
		app.Name = name
	}
	if set["cpu-affinity"] {
		app.CPUAffinity = affinity
	}
	return nil
}

// listenAddr is the address a listener actually got (the port for ":0").
func listenAddr(f *os.File, fallback string) string {
	if a := dispatcher.BoundAddr(f); a != "" {
		return a
	}
	return fallback
}

// closeAll closes sets of files.
func closeAll(sets ...[]*os.File) {
	for _, set := range sets {
		for _, f := range set {
			f.Close()
		}
	}
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }
