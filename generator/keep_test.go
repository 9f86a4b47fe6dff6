package generator

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The running configuration of app web (port 8080) and the same file with
// a typo on line 2 and another port.
const (
	keepGood = "command = [\"/bin/app\"]\nworkers = 2\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"
	keepBad  = "command = [\"/bin/app\"]\nwokers = 2\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:9090\"\n"
)

// TestGeneratorKeepsRunningConfig runs the real cohort-generator over a
// broken app file whose app runs (a snapshot in COHORT_RUNNING_DIR): the
// units are rendered from the snapshot, SourcePath= still names the app
// file, and the journal line says so. A broken file without a snapshot
// (nothing runs, as at boot) is skipped as before, and a snapshot that
// someone other than root may write is not trusted. (Issue 13.1: before,
// the generator skipped the file and systemd lost the running app's
// socket.)
func TestGeneratorKeepsRunningConfig(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "cohort-generator")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/cohort-generator").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	etc, runDir := t.TempDir(), t.TempDir()
	write := func(path, body string, mode os.FileMode) {
		t.Helper()
		if err := os.WriteFile(path, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(etc, "web.toml"), keepBad, 0o644)
	write(filepath.Join(runDir, "web.toml"), keepGood, 0o644)
	write(filepath.Join(etc, "fresh.toml"), strings.Replace(keepBad, "9090", "9091", 1), 0o644) // never ran
	write(filepath.Join(etc, "open.toml"), strings.Replace(keepBad, "9090", "9092", 1), 0o644)
	write(filepath.Join(runDir, "open.toml"), strings.Replace(keepGood, "8080", "8082", 1), 0o666) // anyone may write it

	normal := t.TempDir()
	cmd := exec.Command(bin, normal, t.TempDir(), t.TempDir())
	cmd.Env = append(os.Environ(), "COHORT_SEARCH_PATH="+etc, "COHORT_UNIT_DIRS=", "COHORT_GENERATOR_LOG=stderr", "COHORT_RUNNING_DIR="+runDir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Errorf("exit = %v, want status 1 (bad files)", err)
	}
	web := filepath.Join(etc, "web.toml")
	wantLine := web + `:2:1: unknown key "wokers" (did you mean "workers"?); keeping the running configuration of web` + "\n"
	if !strings.Contains(stderr.String(), wantLine) {
		t.Errorf("stderr lacks %q:\n%s", wantLine, &stderr)
	}
	if strings.Contains(stderr.String(), "skipped "+web) {
		t.Errorf("web.toml reported as skipped:\n%s", &stderr)
	}
	for _, want := range []string{
		"skipped " + filepath.Join(etc, "fresh.toml"),
		"skipped " + filepath.Join(etc, "open.toml"),
		filepath.Join(runDir, "open.toml") + ": writable by group or others",
	} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, &stderr)
		}
	}
	if got := strings.Join(listTree(t, normal), " "); got != "web.service web.socket" {
		t.Fatalf("normal dir holds %q, want only web's units", got)
	}
	sock, err := os.ReadFile(filepath.Join(normal, "web.socket"))
	if err != nil {
		t.Fatal(err)
	}
	svc, err := os.ReadFile(filepath.Join(normal, "web.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{"SourcePath=" + web, "ListenStream=127.0.0.1:8080"} {
		if !strings.Contains(string(sock), line+"\n") {
			t.Errorf("web.socket lacks %q:\n%s", line, sock)
		}
	}
	for _, line := range []string{"SourcePath=" + web, "Description=cohort app web (2 workers, shared mode)", "ExecStart=/usr/bin/cohort dispatch " + web} {
		if !strings.Contains(string(svc), line+"\n") {
			t.Errorf("web.service lacks %q:\n%s", line, svc)
		}
	}

	// Fixed: the file applies again, snapshot or not.
	write(web, strings.Replace(keepGood, "8080", "9090", 1), 0o644)
	normal = t.TempDir()
	cmd = exec.Command(bin, normal, t.TempDir(), t.TempDir())
	cmd.Env = append(os.Environ(), "COHORT_SEARCH_PATH="+etc, "COHORT_UNIT_DIRS=", "COHORT_GENERATOR_LOG=stderr", "COHORT_RUNNING_DIR="+runDir)
	out, _ := cmd.CombinedOutput()
	if strings.Contains(string(out), "keeping the running configuration of web") {
		t.Errorf("kept the snapshot of a valid file:\n%s", out)
	}
	if sock, err := os.ReadFile(filepath.Join(normal, "web.socket")); err != nil || !strings.Contains(string(sock), "ListenStream=127.0.0.1:9090\n") {
		t.Errorf("after the fix web.socket is %v:\n%s", err, sock)
	}
}

// TestRunRunningDirOption: the fallback in-process, through
// Options.RunningDir; without it a bad file is skipped.
func TestRunRunningDirOption(t *testing.T) {
	etc, runDir := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(etc, "web.toml"), []byte(keepBad), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(runDir, "web.toml"), []byte(keepGood), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		dir   string
		files string
		log   string
	}{
		{runDir, "web.service web.socket", "; keeping the running configuration of web\n"},
		{"", "", "cohort-generator: skipped "},
		{t.TempDir(), "", "cohort-generator: skipped "}, // no snapshot
	} {
		var log bytes.Buffer
		g := &Generator{SearchPath: []string{etc}, Options: Options{RunningDir: tt.dir}, Log: &log}
		out := t.TempDir()
		if err := g.Run(out); !errors.Is(err, ErrBadApps) {
			t.Errorf("RunningDir %q: Run = %v, want ErrBadApps", tt.dir, err)
		}
		if got := strings.Join(listTree(t, out), " "); got != tt.files {
			t.Errorf("RunningDir %q: wrote %q, want %q", tt.dir, got, tt.files)
		}
		if !strings.Contains(log.String(), tt.log) {
			t.Errorf("RunningDir %q: log lacks %q:\n%s", tt.dir, tt.log, &log)
		}
	}
}
