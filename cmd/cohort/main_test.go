package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runCohort runs a subcommand in-process with its own streams.
func runCohort(t *testing.T, searchPath []string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	env := &environment{stdout: &out, stderr: &errOut, searchPath: searchPath}
	code = runMain(context.Background(), env, args)
	return code, out.String(), errOut.String()
}

func writeApp(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const goodApp = "command = [\"/bin/app\"]\nenable = true\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	// check also asks whether the command exists here: /bin/sh does.
	good := writeApp(t, dir, "web.toml", strings.Replace(goodApp, "/bin/app", "/bin/sh", 1))
	bad := writeApp(t, dir, "bad.toml", "command = [\"/bin/app\"]\nworkers = 2\nwokers = 4\nmode = \"sharde\"\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n")

	code, out, errOut := runCohort(t, nil, "check", good)
	if code != 0 || !strings.Contains(out, "web.toml: ok (app web, auto workers, shared mode, 1 listener)") || errOut != "" {
		t.Errorf("check good: code %d\nstdout %s\nstderr %s", code, out, errOut)
	}
	code, _, errOut = runCohort(t, nil, "check", good, bad)
	want := bad + ":3:1: unknown key \"wokers\" (did you mean \"workers\"?)\n" +
		bad + ":4:1: mode: want \"shared\", \"round-robin\" or \"reuseport\", got \"sharde\" (did you mean \"shared\"?)\n"
	if code != 1 || errOut != want {
		t.Errorf("check bad: code %d\nstderr %s\nwant   %s", code, errOut, want)
	}
	// Without arguments: the search path.
	code, out, _ = runCohort(t, []string{dir}, "check", "--quiet")
	if code != 1 || out != "" {
		t.Errorf("check --quiet on search path: code %d, stdout %q", code, out)
	}
	code, _, errOut = runCohort(t, []string{t.TempDir()}, "check")
	if code != 1 || !strings.Contains(errOut, "no app files in") {
		t.Errorf("empty search path: code %d, stderr %q", code, errOut)
	}
}

func TestGenerate(t *testing.T) {
	dir := t.TempDir()
	app := writeApp(t, dir, "web.toml", goodApp)
	code, out, errOut := runCohort(t, nil, "generate", app)
	if code != 0 || errOut != "" {
		t.Fatalf("generate: code %d, stderr %s", code, errOut)
	}
	for _, want := range []string{"# web.socket\n", "# web.service\n", "ExecStart=/usr/bin/cohort dispatch " + app + "\n", "ListenStream=127.0.0.1:8080\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	outDir := filepath.Join(t.TempDir(), "units")
	code, _, errOut = runCohort(t, nil, "generate", "--dir", outDir, "--cohort", "/opt/cohort", app)
	if code != 0 || errOut != "" {
		t.Fatalf("generate --dir: code %d, stderr %s", code, errOut)
	}
	svc, err := os.ReadFile(filepath.Join(outDir, "web.service"))
	if err != nil || !strings.Contains(string(svc), "ExecStart=/opt/cohort dispatch ") {
		t.Errorf("web.service: %v\n%s", err, svc)
	}
	if _, err := os.Readlink(filepath.Join(outDir, "sockets.target.wants", "web.socket")); err != nil {
		t.Errorf("enabled app has no wants link: %v", err)
	}
}

// A relative file name still gives units with absolute paths: systemd
// ignores a relative SourcePath= and runs ExecStart= from /.
func TestGenerateRelativePath(t *testing.T) {
	dir := t.TempDir()
	writeApp(t, dir, "web.toml", goodApp)
	t.Chdir(dir)
	code, out, errOut := runCohort(t, nil, "generate", "web.toml")
	if code != 0 {
		t.Fatalf("generate: %d %s", code, errOut)
	}
	abs := filepath.Join(dir, "web.toml")
	for _, want := range []string{"SourcePath=" + abs + "\n", "ExecStart=/usr/bin/cohort dispatch " + abs + "\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

func TestUsageAndVersion(t *testing.T) {
	if code, out, _ := runCohort(t, nil, "help"); code != 0 || !strings.Contains(out, "check") {
		t.Errorf("help: %d %s", code, out)
	}
	if code, _, errOut := runCohort(t, nil, "frobnicate"); code != 2 || !strings.Contains(errOut, `unknown command "frobnicate"`) {
		t.Errorf("unknown command: %d %s", code, errOut)
	}
	if code, out, _ := runCohort(t, nil, "version"); code != 0 || !strings.HasPrefix(out, "cohort ") {
		t.Errorf("version: %d %s", code, out)
	}
	if code, _, errOut := runCohort(t, nil, "check", "--help"); code != 0 || !strings.Contains(errOut, "usage: cohort check") {
		t.Errorf("check --help: %d %s", code, errOut)
	}
}

// TestCheckRecycle: cohort check accepts a [recycle] table and refuses
// max_connections outside round-robin mode, at its key, saying why.
func TestCheckRecycle(t *testing.T) {
	dir := t.TempDir()
	base := strings.Replace(goodApp, "/bin/app", "/bin/sh", 1)
	good := writeApp(t, dir, "web.toml", "mode = \"round-robin\"\n"+base+"[recycle]\nmemory = \"400M\"\nmax_lifetime = \"6h\"\nmax_lifetime_jitter = \"30min\"\nmax_connections = 10000\n")
	if code, out, errOut := runCohort(t, nil, "check", good); code != 0 || errOut != "" {
		t.Errorf("check with [recycle]: code %d\nstdout %s\nstderr %s", code, out, errOut)
	}
	bad := writeApp(t, dir, "api.toml", base+"[recycle]\nmax_connections = 10000\n")
	code, _, errOut := runCohort(t, nil, "check", bad)
	want := bad + `:7:1: max_connections applies only to mode = "round-robin": in mode = "shared" the workers accept on their own and the dispatcher cannot count their connections (use max_lifetime or memory)` + "\n"
	if code != 1 || errOut != want {
		t.Errorf("check max_connections in shared mode: code %d\nstderr %s\nwant   %s", code, errOut, want)
	}
}
