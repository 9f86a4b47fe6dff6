package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/cpuset"
	"github.com/cohort-dev/cohort/internal/logline"
	"github.com/cohort-dev/cohort/internal/sockets"
)

const runArgs = `[OPTIONS] FILE.toml
       cohort run --listen [NAME=]ADDRESS [--listen …] [OPTIONS] -- COMMAND [ARGS…]`

const runAbout = `Run an app in the foreground, binding its sockets itself (like
systemd-socket-activate) and supervising its workers as the service would:
worker output is printed as "app.N | line" (cohort's own lines as
"app.cohort | …"), Ctrl-C stops the workers
gracefully (a second Ctrl-C kills them). Options override the file.`

// cmdRun is `cohort run`: the dispatcher in the foreground, with
// listeners it binds itself.
func cmdRun(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "run", runArgs, runAbout)
	var listens listFlag
	fs.Var(&listens, "listen", "a socket to listen on, `[NAME=]ADDRESS` (host:port, [v6]:port, /path.sock, @abstract); repeatable")
	workers := fs.String("workers", "", "`N` or \"auto\" (one per CPU); default: the file's, else auto")
	mode := fs.String("mode", "", "\"shared\" (default), \"round-robin\" or \"reuseport\"")
	ready := fs.String("ready", "", "`WHEN` a worker counts as ready: listening (the default), notify, exec or a duration")
	name := fs.String("name", "", "the app's name in output, COHORT_APP and 'cohort status NAME' (default: the file's, or the\nbase name of the script an interpreter runs, or of the command)")
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

	inst, err := env.claimRunDir(ctx, app.Name)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
		return 1
	}
	defer inst.release()
	fmt.Fprintf(env.stderr, "%s | control socket: %s (cohort status %s)\n", logline.Dispatcher(app.Name), filepath.Join(inst.dir, control.SocketName), app.Name)

	opts := dispatcher.Options{App: app, Stdout: env.stdout, Stderr: env.stderr, Notify: sdNotify, HandleSignals: true, Subreaper: env.ownsChildren, RuntimeDir: inst.dir, FailUnready: true,
		// The same per-worker cgroups as under systemd where this process
		// has a cgroup2 subtree of its own (a container with its own
		// cgroup namespace, systemd-run --scope -p Delegate=yes); elsewhere
		// [limits] are refused, saying why. Only the controllers the
		// limits need, so that a container's exec sessions can still join
		// its cgroup.
		Cgroups: env.ownsChildren, CgroupsForLimitsOnly: true,
		Color: colorTerminal(env.stdout), NodePreload: nodePreloadFile()}
	if app.Mode == appfile.ModeReusePort {
		limit, err := cpuset.Read()
		if err != nil {
			fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
			return 1
		}
		n := app.Workers.Count(limit.Count())
		if opts.SlotListeners, err = sockets.BindSlots(app, n); err != nil {
			fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
			return 1
		}
		defer closeAll(opts.SlotListeners...)
		for i, f := range opts.SlotListeners[0] {
			fmt.Fprintf(env.stderr, "%s | listening on %s (%s, %d reuseport sockets)\n", logline.Dispatcher(app.Name), listenAddr(f, app.Listen[i].Address), app.Listen[i].Name, n)
		}
	} else {
		files, cleanup, err := sockets.Bind(app)
		if err != nil {
			fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
			return 1
		}
		defer cleanup()
		defer closeAll(files)
		for i, f := range files {
			fmt.Fprintf(env.stderr, "%s | listening on %s (%s)\n", logline.Dispatcher(app.Name), listenAddr(f, app.Listen[i].Address), app.Listen[i].Name)
		}
		opts.Listeners = files
	}
	metrics, cleanupMetrics, err := sockets.BindMetrics(app)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort run: %v\n", err)
		return 1
	}
	if metrics != nil {
		defer cleanupMetrics()
		defer metrics.Close()
		fmt.Fprintf(env.stderr, "[%s] metrics on %s (/metrics, /readyz, /livez)\n", app.Name, listenAddr(metrics, app.Metrics.Listen.Address))
		opts.Metrics = metrics
	}
	// A reload (SIGHUP, or the control socket) re-reads the file and
	// applies the same flags again.
	load := func() (*appfile.App, error) {
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
func runApp(args []string, listens listFlag) (*appfile.App, error) {
	if len(listens) == 0 {
		if len(args) != 1 {
			return nil, fmt.Errorf("want FILE.toml, or --listen ADDRESS -- COMMAND (see 'cohort run --help')")
		}
		return appfile.ParseFile(args[0])
	}
	if len(args) == 0 {
		return nil, fmt.Errorf("--listen needs a command: cohort run --listen %s -- COMMAND [ARGS…]", listens[0])
	}
	app := appfile.New(defaultName(args))
	app.Command = args
	app.NodePreload = appfile.NodeProgram(args)
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
		kind, hint, err := appfile.ParseAddress(addr)
		switch {
		case err == nil:
		case strings.HasPrefix(addr, "localhost:") && hint != "":
			addr, kind = hint, appfile.ListenTCP
		case strings.HasSuffix(addr, ":0"): // any free port, printed at start
			kind = appfile.ListenTCP
		default:
			return nil, fmt.Errorf("--listen %s: %v", l, err)
		}
		app.Listen = append(app.Listen, appfile.Listener{Name: name, Address: addr, Kind: kind})
	}
	return app, nil
}

func applyRunFlags(app *appfile.App, set map[string]bool, workers, mode, ready, name string, affinity bool) error {
	if set["workers"] {
		if workers == "auto" {
			app.Workers = appfile.Workers{Auto: true}
		} else {
			n, err := strconv.Atoi(workers)
			if err != nil || n < 1 || n > appfile.MaxWorkers {
				return fmt.Errorf("--workers %q: want \"auto\" or 1 to %d", workers, appfile.MaxWorkers)
			}
			app.Workers = appfile.Workers{N: n}
		}
	}
	if set["mode"] {
		switch m := appfile.Mode(mode); m {
		case appfile.ModeShared, appfile.ModeRoundRobin, appfile.ModeReusePort:
			app.Mode = m
		default:
			return fmt.Errorf("--mode %q: want %q, %q or %q", mode, appfile.ModeShared, appfile.ModeRoundRobin, appfile.ModeReusePort)
		}
	}
	if set["ready"] {
		switch ready {
		case "listening":
			app.Ready = appfile.Readiness{Kind: appfile.ReadyListening}
		case "notify":
			app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
		case "exec":
			app.Ready = appfile.Readiness{Kind: appfile.ReadyExec}
		default:
			d, err := appfile.ParseDuration(ready)
			if err != nil {
				return fmt.Errorf("--ready %q: want listening, notify, exec or a duration: %v", ready, err)
			}
			app.Ready = appfile.Readiness{Kind: appfile.ReadyDelay, Delay: d}
		}
	}
	if set["name"] {
		if err := appfile.CheckAppName(name); err != nil {
			return fmt.Errorf("--name: %v", err)
		}
		app.Name = name
	}
	if set["cpu-affinity"] {
		app.CPUAffinity = affinity
	}
	return nil
}

// interpreters are programs whose first operand is the program that
// names the app (`node server.js` is "server"), as PM2 names them.
var interpreters = map[string]bool{
	"node": true, "nodejs": true, "bun": true, "deno": true, "python": true, "python2": true, "python3": true,
	"pypy": true, "pypy3": true, "ruby": true, "perl": true, "php": true, "sh": true, "bash": true, "dash": true, "zsh": true,
}

// scriptExt are the extensions dropped from a script's name.
var scriptExt = []string{".js", ".mjs", ".cjs", ".ts", ".py", ".rb", ".pl", ".php", ".sh"}

// defaultName is the app name of `cohort run --listen … -- COMMAND`
// without --name: the base name of the script an interpreter runs
// (`node server.js` → "server", `python3 app.py` → "app",
// `python3 -m http.server` → "http.server", `deno run main.ts` →
// "main"), else of the program (`./bin/api` → "api", `gunicorn app:app`
// → "gunicorn"), made a valid app name.
func defaultName(command []string) string {
	prog := filepath.Base(command[0])
	name := prog
	if interpreters[strings.TrimRight(strings.TrimSuffix(prog, filepath.Ext(prog)), "0123456789.")] || interpreters[prog] {
		args := command[1:]
		if (prog == "deno" || prog == "bun") && len(args) > 0 && args[0] == "run" {
			args = args[1:]
		}
	scan:
		for i := 0; i < len(args); i++ {
			a := args[i]
			switch {
			case a == "-m" && i+1 < len(args): // python -m MODULE
				name = args[i+1]
				break scan
			case a == "-c" || a == "-e" || a == "--eval" || a == "-":
				break scan // inline code: the interpreter's name it is
			case a == "--":
				if i+1 < len(args) {
					name = filepath.Base(args[i+1])
				}
				break scan
			case strings.HasPrefix(a, "-"):
				continue
			default:
				name = filepath.Base(a)
				break scan
			}
		}
		for _, ext := range scriptExt {
			if n, ok := strings.CutSuffix(name, ext); ok && n != "" {
				name = n
				break
			}
		}
	}
	return sanitizeName(name, prog)
}

// sanitizeName makes name a valid app name: characters other than
// letters, digits and _ . : - become "-", a leading "-" or "." goes, and
// it is cut to appfile.MaxAppName. When nothing is left, fallback (or
// "app") is used the same way.
func sanitizeName(name, fallback string) string {
	clean := func(s string) string {
		b := []byte(s)
		for i, c := range b {
			ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == ':' || c == '-'
			if !ok {
				b[i] = '-'
			}
		}
		s = strings.TrimLeft(string(b), "-.")
		if len(s) > appfile.MaxAppName {
			s = s[:appfile.MaxAppName]
		}
		return s
	}
	for _, s := range []string{name, fallback, "app"} {
		if c := clean(s); appfile.CheckAppName(c) == nil {
			return c
		}
	}
	return "app"
}

// listenAddr is the address a listener actually got (the port for ":0").
func listenAddr(f *os.File, fallback string) string {
	if a := sockets.BoundAddr(f); a != "" {
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

// nodePreloadFile is the Node preload module `cohort run` gives node
// workers: the installed one (dispatcher.DefaultNodePreload), else, for
// a binary run from a build tree (bin/cohort), the repository's.
func nodePreloadFile() string {
	if _, err := os.Stat(dispatcher.DefaultNodePreload); err == nil {
		return dispatcher.DefaultNodePreload
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "..", "packaging", "node-preload.js")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}
