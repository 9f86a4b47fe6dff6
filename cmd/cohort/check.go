package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/generator"
)

// newFlags makes a subcommand's flag set that prints its usage to stderr
// and returns errors instead of exiting.
func newFlags(env *environment, name, args, about string) *flag.FlagSet {
	fs := flag.NewFlagSet("cohort "+name, flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	fs.Usage = func() {
		fmt.Fprintf(env.stderr, "usage: cohort %s %s\n\n%s\n", name, args, about)
		if hasFlags(fs) {
			fmt.Fprintln(env.stderr, "\noptions:")
			fs.PrintDefaults()
		}
	}
	return fs
}

func hasFlags(fs *flag.FlagSet) bool {
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	return n > 0
}

// parseFlags parses args; done is true when the command should return code
// right away (--help, or a bad flag).
func parseFlags(fs *flag.FlagSet, args []string) (code int, done bool) {
	switch err := fs.Parse(args); {
	case err == flag.ErrHelp:
		return 0, true
	case err != nil:
		return 2, true
	}
	return 0, false
}

// parseLeading is parseFlags for commands whose positional arguments may
// come before the options too ("cohort logs web -f"): it returns them,
// those before and those after.
func parseLeading(fs *flag.FlagSet, args []string) (pos []string, code int, done bool) {
	for len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		pos, args = append(pos, args[0]), args[1:]
	}
	if code, done := parseFlags(fs, args); done {
		return nil, code, true
	}
	return append(pos, fs.Args()...), 0, false
}

// appFiles returns the files named on the command line, or every app file
// on the search path.
func appFiles(env *environment, args []string) ([]string, error) {
	if len(args) > 0 {
		return args, nil
	}
	path := env.searchPath
	if path == nil {
		path = appfile.SearchPath()
	}
	files, err := appfile.Discover(path)
	if err == nil && len(files) == 0 {
		err = fmt.Errorf("no app files in %v", path)
	}
	return files, err
}

func cmdCheck(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "check", "[--offline] [FILE.toml…]",
		"Validate app files: every error is printed as file:line:col, and the exit\n"+
			"status is 1 when any file has one. Without FILE, checks every app on the\n"+
			"search path (/etc/cohort, /run/cohort, /usr/lib/cohort).\n\n"+
			"Beyond the format, check asks this host what would fail later: that the\n"+
			"command exists and is executable (found as the service will find it), and\n"+
			"that systemd knows every [unit], [service] and [socket] directive (by\n"+
			"running systemd-analyze verify on the units, when it is installed).")
	quiet := fs.Bool("quiet", false, "print errors only")
	offline := fs.Bool("offline", false, "the files are meant for another host: report what depends on this one\n(a missing command or environment file, a directive this systemd does not know)\nas warnings")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	files, err := appFiles(env, fs.Args())
	code := 0
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort check: %v\n", err)
		code = 1
	}
	hc := &hostChecks{ctx: ctx, offline: *offline, stderr: env.stderr, cgroupRoot: cmp.Or(env.cgroupRoot, "/sys/fs/cgroup")}
	for _, path := range files {
		app, data, err := appfile.ParseFileSource(path)
		var us *generator.Units
		if err == nil {
			// What depends on this host (a working_directory that
			// does not exist): the generator does not check it.
			err = hostOnly(appfile.CheckHost(app), *offline, env.stderr)
		}
		if err == nil {
			us, err = generator.Render(app, generator.Options{CohortPath: hc.cohortPath()})
		}
		if err != nil {
			fmt.Fprintln(env.stderr, err)
			code = 1
			continue
		}
		if !hc.check(path, app, data, us) {
			code = 1
			continue
		}
		if !*quiet {
			describeApp(env.stdout, app)
		}
	}
	return code
}

func describeApp(w io.Writer, app *appfile.App) {
	workers := "auto"
	if !app.Workers.Auto {
		workers = fmt.Sprint(app.Workers.N)
	}
	fmt.Fprintf(w, "%s: ok (app %s, %s workers, %s mode, %d listener", app.Path, app.Name, workers, app.Mode, len(app.Listen))
	if len(app.Listen) != 1 {
		fmt.Fprint(w, "s")
	}
	if app.Metrics.On() {
		fmt.Fprintf(w, ", metrics on %s", app.Metrics.Listen.Address)
	}
	fmt.Fprintln(w, ")")
}

// hostOnly turns an error about this host into printed warnings when the
// files are meant for another host (--offline), like hostChecks does.
func hostOnly(err error, offline bool, stderr io.Writer) error {
	var es appfile.Errors
	if err == nil || !offline || !errors.As(err, &es) {
		return err
	}
	for _, e := range es {
		w := *e
		w.Msg = "warning: " + w.Msg
		fmt.Fprintln(stderr, &w)
	}
	return nil
}
