package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/appfile"
)

// runInit runs `cohort init` in-process with dir as the search path and
// the fake systemd sd.
func runInit(t *testing.T, dir string, sd initSystemd, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	env := &environment{stdout: &out, stderr: &errOut, searchPath: []string{dir}, runtimeRoot: t.TempDir(), initSystemd: sd,
		units: func(context.Context, string) (unitState, unitState, error) {
			return unitState{Active: "active"}, unitState{Active: "active"}, nil
		}}
	code = runMain(context.Background(), env, append([]string{"init"}, args...))
	return code, out.String(), errOut.String()
}

// TestInitDryRun: the file init prints is one every reader of app files
// takes as what was asked: the command verbatim (quotes, backslashes), the
// workers, mode, readiness chosen for the program, this directory, the
// listeners; NAME may come before or after the flags.
func TestInitDryRun(t *testing.T) {
	dir := t.TempDir()
	wd, _ := os.Getwd()
	for _, args := range [][]string{
		{"web", "--listen", ":3000", "--workers", "3", "--dry-run", "--", "node", `a "quoted\ path`, "--x"},
		{"--listen", ":3000", "--workers", "3", "web", "--dry-run", "--", "node", `a "quoted\ path`, "--x"},
	} {
		code, out, errOut := runInit(t, dir, nil, args...)
		if code != 0 {
			t.Fatalf("init %q: %d %s", args, code, errOut)
		}
		app, err := appfile.Parse(filepath.Join(dir, "web.toml"), []byte(out))
		if err != nil {
			t.Fatalf("init %q printed a file that does not parse: %v\n%s", args, err, out)
		}
		if want := []string{"node", `a "quoted\ path`, "--x"}; !slices.Equal(app.Command, want) {
			t.Errorf("command %q, want %q", app.Command, want)
		}
		if app.Workers.N != 3 || app.Mode != appfile.ModeShared || app.Ready.Kind != appfile.ReadyListening || app.WorkingDirectory != wd {
			t.Errorf("workers %+v mode %s ready %s wd %q", app.Workers, app.Mode, app.Ready.Kind, app.WorkingDirectory)
		}
		if len(app.Listen) != 1 || app.Listen[0].Name != "http" || app.Listen[0].Address != ":3000" {
			t.Errorf("listen %+v", app.Listen)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("--dry-run wrote %v", entries)
		}
	}
	// gunicorn sends READY=1: notify; --ready wins over the choice.
	_, out, _ := runInit(t, dir, nil, "py", "--listen", "127.0.0.1:8000", "--dry-run", "--", "gunicorn", "app:app")
	if !strings.Contains(out, "\nready = \"notify\"\n") {
		t.Errorf("gunicorn: %s", out)
	}
	_, out, _ = runInit(t, dir, nil, "js", "--listen", ":1", "--ready", "exec", "--mode", "reuseport", "--workers", "auto", "--dry-run", "--", "node", "x.js")
	if !strings.Contains(out, "\nready = \"exec\"\n") || !strings.Contains(out, "\nmode = \"reuseport\"\n") || !strings.Contains(out, "\nworkers = \"auto\"\n") {
		t.Errorf("--ready exec --mode reuseport: %s", out)
	}
}

// TestInitRefuses: bad input is a usage error naming the problem, and
// nothing is written or started.
func TestInitRefuses(t *testing.T) {
	dir := t.TempDir()
	called := false
	sd := func(context.Context, ...string) error { called = true; return nil }
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"web", "--", "node", "x.js"}, "usage"},
		{[]string{"web", "--listen", ":3000"}, "usage"},
		{[]string{"../x", "--listen", ":3000", "--", "node"}, "app name"},
		{[]string{"web", "--listen", ":3000", "--workers", "0", "--", "node"}, "--workers"},
		{[]string{"web", "--listen", ":3000", "--mode", "cluster", "--", "node"}, "mode"},
		{[]string{"web", "--listen", "nowhere", "--", "node"}, "address"},
		{[]string{"web", "--listen", ":3000", "--", "node", "a\nExecStartPre=/bin/evil"}, "control character"},
	} {
		code, _, errOut := runInit(t, dir, sd, c.args...)
		if code != 2 || !strings.Contains(errOut, c.want) {
			t.Errorf("init %q: exit %d, want 2 and %q in:\n%s", c.args, code, c.want, errOut)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 || called {
		t.Errorf("refused inits wrote %v, started units: %v", entries, called)
	}
}

// TestInitNeverOverwrites: an app that exists (in the directory written
// to, or anywhere on the search path) is refused and its file untouched.
func TestInitNeverOverwrites(t *testing.T) {
	dir := t.TempDir()
	path := writeApp(t, dir, "web.toml", "command = [\"/bin/true\"]\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:1\"\n")
	before, _ := os.ReadFile(path)
	other := t.TempDir()
	sd := func(context.Context, ...string) error { t.Error("started units"); return nil }
	for _, target := range []string{dir, other} {
		code, _, errOut := runInit(t, dir, sd, "web", "--dir", target, "--listen", ":3000", "--", "/bin/sleep", "1")
		if code != 1 || !strings.Contains(errOut, "exists already") {
			t.Errorf("--dir %s: exit %d, %s", target, code, errOut)
		}
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Errorf("the existing file changed:\n%s", after)
	}
	if entries, _ := os.ReadDir(other); len(entries) != 0 {
		t.Errorf("wrote %v", entries)
	}
	// Written between init's look and its write: O_EXCL still refuses.
	if err := writeNew(path, []byte("x")); err == nil || !strings.Contains(err.Error(), "exists already") {
		t.Errorf("writeNew over a file: %v", err)
	}
}

// TestInitChecksThenStarts: a file that fails 'cohort check' (its
// program does not exist) is removed and nothing started; a good one is
// kept, and systemd is asked for the socket, then the service.
func TestInitChecksThenStarts(t *testing.T) {
	dir := t.TempDir()
	var started []string
	sd := func(_ context.Context, units ...string) error { started = append(started, units...); return nil }
	code, _, errOut := runInit(t, dir, sd, "web", "--dir", dir, "--listen", "127.0.0.1:3000", "--", filepath.Join(dir, "no-such-program"))
	if code != 1 || !strings.Contains(errOut, "no-such-program") || !strings.Contains(errOut, "removed it") {
		t.Errorf("bad program: exit %d\n%s", code, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, "web.toml")); !os.IsNotExist(err) || started != nil {
		t.Fatalf("a file that failed the check was kept (%v) or started %v", err, started)
	}
	code, out, errOut := runInit(t, dir, sd, "web", "--dir", dir, "--listen", "127.0.0.1:3000", "--", "/bin/sleep", "1")
	if !slices.Equal(started, []string{"web.socket", "web.service"}) {
		t.Fatalf("started %v (exit %d)\n%s%s", started, code, out, errOut)
	}
	if !strings.Contains(out, "wrote "+filepath.Join(dir, "web.toml")) {
		t.Errorf("output:\n%s", out)
	}
	// Then it shows the status: here no dispatcher answers, which status
	// says (the real one is the vmtests' testInit).
	if code != 1 || !strings.Contains(errOut, "cohort status web") {
		t.Errorf("status after start: exit %d\n%s", code, errOut)
	}
}
