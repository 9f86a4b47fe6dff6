package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/appfile"
)

// `cohort init`: from nothing to a running app in one command, what `pm2
// start app.js -i max` is to PM2. It writes the app file a person would
// have written (commented, so it is also the documentation of what it
// chose), checks it as `cohort check` does, and asks systemd to generate
// and start the units.

const initArgs = `NAME --listen [LNAME=]ADDRESS [--listen …] [--workers N|auto] [--mode MODE] [--ready WHEN] [--dry-run] -- COMMAND [ARGS…]`

const initAbout = `Write /etc/cohort/NAME.toml for COMMAND (commented; its readiness chosen for
the program, its working directory this one), check it as 'cohort check'
does, run 'systemctl daemon-reload', start NAME.socket and NAME.service and
print 'cohort status NAME'. An app NAME that exists already is refused:
edit its file instead. --dry-run prints the file and changes nothing.`

// initDir is where `cohort init` writes app files.
const initDir = "/etc/cohort"

// initTimeout bounds the start jobs `cohort init` waits for.
const initTimeout = 2 * time.Minute

// initSystemd is what `cohort init` asks of systemd; tests replace it
// (environment.initSystemd), the real one is D-Bus (initOverDBus).
type initSystemd func(ctx context.Context, units ...string) error

func cmdInit(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "init", initArgs, initAbout)
	var listens listFlag
	fs.Var(&listens, "listen", "a socket to listen on, `[LNAME=]ADDRESS` (host:port, :port, [v6]:port, /path.sock, @abstract); repeatable")
	workers := fs.String("workers", "auto", "`N` or \"auto\" (one per CPU)")
	mode := fs.String("mode", "shared", "\"shared\", \"round-robin\" or \"reuseport\"")
	ready := fs.String("ready", "", "`WHEN` a worker counts as ready: listening, notify, exec or a duration (default: chosen for the program)")
	dir := fs.String("dir", initDir, "the `DIR` to write NAME.toml into")
	dryRun := fs.Bool("dry-run", false, "print the app file only: write nothing, start nothing")
	// NAME comes first, and flag stops at the first argument that is not
	// a flag: take it off before parsing (it may also follow the flags).
	var name string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		name, args = args[0], args[1:]
	}
	if code, done := parseFlags(fs, args); done {
		return code
	}
	command := fs.Args()
	if name == "" && len(command) > 0 && command[0] != "" && !strings.HasPrefix(command[0], "-") && !dashDash(args[:len(args)-len(command)]) {
		// NAME after the flags: the flags after it are parsed too.
		name = command[0]
		if code, done := parseFlags(fs, command[1:]); done {
			return code
		}
		command = fs.Args()
	}
	if name == "" || len(command) == 0 || len(listens) == 0 {
		fs.Usage()
		return 2
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	wd, err := os.Getwd()
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort init: %v\n", err)
		return 1
	}
	spec := initSpec{Name: name, Command: command, Listen: listens, Workers: *workers, Mode: *mode, Ready: *ready, WorkingDirectory: wd}
	path := filepath.Join(*dir, name+".toml")
	text, err := spec.render(path)
	if err == nil {
		// What the file says must be what was asked: parse it as every
		// reader of app files will.
		_, err = appfile.Parse(path, text)
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort init: %v\n", err)
		return 2
	}
	if *dryRun {
		env.stdout.Write(text)
		return 0
	}
	if existing := appFile(env, name); existing != "" {
		fmt.Fprintf(env.stderr, "cohort init: app %q exists already (%s): edit that file, or remove it first\n", name, existing)
		return 1
	}
	if err := writeNew(path, text); err != nil {
		fmt.Fprintf(env.stderr, "cohort init: %v\n", err)
		return 1
	}
	fmt.Fprintf(env.stdout, "wrote %s\n", path)
	if code := cmdCheck(ctx, env, []string{"--quiet", path}); code != 0 {
		// The file is ours (we just created it) and it would not run:
		// leave nothing behind that the next daemon-reload trips over.
		os.Remove(path)
		fmt.Fprintf(env.stderr, "cohort init: %s does not pass 'cohort check' (above); removed it ('cohort init --dry-run …' prints it)\n", path)
		return 1
	}
	sd := env.initSystemd
	if sd == nil {
		sd = initOverDBus
	}
	ctx2, cancel := context.WithTimeout(ctx, initTimeout)
	defer cancel()
	if err := sd(ctx2, name+".socket", name+".service"); err != nil {
		fmt.Fprintf(env.stderr, "cohort init: %v; see 'systemctl status %s' and 'journalctl -u %s' (the file stays: %s)\n", err, name, name, path)
		return 1
	}
	fmt.Fprintf(env.stdout, "started %s.socket and %s.service\n\n", name, name)
	return cmdStatus(ctx, env, []string{name})
}

// dashDash reports whether args hold "--" (the command's start).
func dashDash(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return true
		}
	}
	return false
}

// writeNew creates path with data and fails when it exists: init never
// overwrites an app file, also not one written between its look and its
// write.
func writeNew(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s exists already: edit it, or remove it first", path)
	}
	if err != nil {
		return fmt.Errorf("create app file: %w", err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// initOverDBus runs daemon-reload (the generator turns the new file into
// units), then starts each unit in order and waits for each job's result.
func initOverDBus(ctx context.Context, units ...string) error {
	conn, err := connectSystemd(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.ReloadContext(ctx); err != nil {
		return fmt.Errorf("daemon-reload: %w", err)
	}
	for _, u := range units {
		done := make(chan string, 1)
		if _, err := conn.StartUnitContext(ctx, u, "replace", done); err != nil {
			return fmt.Errorf("start %s: %w", u, err)
		}
		select {
		case result := <-done:
			if result != "done" {
				return fmt.Errorf("start %s: job %s", u, result)
			}
		case <-ctx.Done():
			return fmt.Errorf("start %s: no result: %w", u, ctx.Err())
		}
	}
	return nil
}

// initSpec is what `cohort init` was asked for.
type initSpec struct {
	Name             string
	Command          []string
	Listen           []string
	Workers          string
	Mode             string
	Ready            string // "" chooses one for the program
	WorkingDirectory string
}

// programKind is what init knows of a command's program: which
// readiness fits it, and why (the comment above ready in the file).
type programKind struct {
	ready string
	why   string
	node  bool
}

// kindOf looks at the program the command runs. Readiness "listening"
// needs nothing from the program, so it is the choice for all that do not
// send READY=1 themselves; it is exact for event loops that wait in epoll
// on the socket (Node's libuv, Python's asyncio, Go's netpoller).
func kindOf(command []string) programKind {
	prog := filepath.Base(command[0])
	base := strings.TrimRight(prog, "0123456789.")
	switch {
	case base == "node" || base == "nodejs":
		return programKind{ready: "listening", node: true, why: "Here: Node waits for connections in libuv's epoll set, which cohort sees in\n# /proc: ready once it accepts, then up for ready_settle (1s). Node cannot\n# send READY=1 to $NOTIFY_SOCKET without a native module."}
	case base == "gunicorn":
		return programKind{ready: "notify", why: "Here: gunicorn's arbiter sends READY=1 to $NOTIFY_SOCKET once it has\n# booted its workers."}
	case base == "bun" || base == "deno" || strings.HasPrefix(base, "python") || base == "ruby" || base == "uvicorn":
		return programKind{ready: "listening", why: "Here: cohort sees the worker wait for connections on its socket (/proc),\n# then it must stay up for ready_settle (1s); nothing needed from the program."}
	}
	return programKind{ready: "listening", why: "Here: the default: cohort sees the worker wait for connections on its socket\n# (/proc), then it must stay up for ready_settle (1s). A program that sends\n# READY=1 to $NOTIFY_SOCKET (cohort's Go library does) is exact with \"notify\"."}
}

// render writes the app file. Every value is a TOML basic string written
// by tomlString, so nothing the user typed can end a string or a line.
func (s initSpec) render(path string) ([]byte, error) {
	if err := appfile.CheckAppName(s.Name); err != nil {
		return nil, err
	}
	var b strings.Builder
	kind := kindOf(s.Command)
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p("# %s: app %s, written by 'cohort init'. Every key is\n", path, s.Name)
	p("# described in cohort.toml(5). After an edit:\n#\n")
	p("#   cohort check %s && systemctl reload %s   (command, workers, ready, …)\n", path, s.Name)
	p("#   systemctl daemon-reload && systemctl restart %s.socket   ([[listen]])\n#\n", s.Name)
	p("# Logs: cohort logs %s -f; workers: cohort status %s, cohort monit.\n\n", s.Name, s.Name)

	p("# The program each worker runs (an argv list, no shell), from this\n")
	p("# directory. Each worker gets the socket(s) at fd 3… (LISTEN_FDS) and\n")
	p("# COHORT_WORKER=<index>.\n")
	quoted := make([]string, len(s.Command))
	for i, a := range s.Command {
		quoted[i] = tomlString(a)
	}
	p("command = [%s]\n", strings.Join(quoted, ", "))
	p("working_directory = %s\n", tomlString(s.WorkingDirectory))
	if kind.node {
		p("# Node programs run unchanged: cohort's preload module makes a listen\n")
		p("# on a port below (app.listen(3000)) use the socket systemd holds.\n")
		p("# node_preload = false turns it off (then listen({fd: 3}) yourself).\n")
	}
	p("\n# How many workers: \"auto\" is one per CPU the service may use.\n")
	if s.Workers == "auto" {
		p("workers = \"auto\"\n")
	} else {
		n, err := strconv.Atoi(s.Workers)
		if err != nil || n < 1 || n > appfile.MaxWorkers {
			return nil, fmt.Errorf("--workers: want \"auto\" or 1..%d, got %q", appfile.MaxWorkers, s.Workers)
		}
		p("workers = %d\n", n)
	}
	p("\n# How connections reach workers: \"shared\" (each worker accepts on the\n")
	p("# same socket), \"round-robin\" (cohort accepts and hands each connection\n")
	p("# to the next ready worker; needs cohort's protocol in the worker) or\n")
	p("# \"reuseport\" (a socket per worker, the kernel spreads connections).\n")
	p("mode = %s\n", tomlString(s.Mode))
	ready, why := kind.ready, kind.why
	if s.Ready != "" {
		ready, why = s.Ready, "As given to cohort init (--ready)."
	}
	p("\n# When a new worker counts as ready (a reload stops an old worker only\n")
	p("# once its replacement is).\n# %s\n", why)
	p("ready = %s\n", tomlString(ready))
	p("\n# The user the workers run as; without it, a transient one\n")
	p("# (DynamicUser=yes) that can read but not write this directory.\n")
	p("#user = \"www-data\"\n")
	p("\n# Start the app at boot (systemctl enable refuses generated units).\n")
	p("#enable = true\n")
	for i, l := range s.Listen {
		name, addr, ok := strings.Cut(l, "=")
		if !ok {
			name, addr = "http", l
			if i > 0 {
				name = "listen" + strconv.Itoa(i)
			}
		}
		p("\n[[listen]]\nname = %s\naddress = %s\n", tomlString(name), tomlString(addr))
	}
	return []byte(b.String()), nil
}

// tomlString quotes s as a TOML basic string. BurntSushi/toml has no
// exported quoting of one value, and this is all of it: backslash, quote
// and control characters escaped (the parser then refuses the control
// characters that cannot reach a unit, with file:line:col).
func tomlString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, "\\u%04X", r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}
