package main

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/generator/running"
)

// A valid app and the same app with a typo on line 2 (port 18080 is
// never bound: only TestStatusShowsBrokenFile runs one, on a free port).
const (
	keepGoodApp = "command = [\"/bin/sleep\", \"600\"]\nworkers = 1\nready = \"exec\"\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:18080\"\n"
	keepBadApp  = "command = [\"/bin/sleep\", \"600\"]\nwokers = 1\nready = \"exec\"\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:18080\"\n"
)

// freePort is a port on 127.0.0.1 that nothing listened on a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestDispatchPrepare: the units' ExecStartPre= records a valid file as
// the running configuration, keeps the recorded one for a broken file
// (exit 0, one journal line), fails for a broken file with nothing to
// keep, and --remove forgets it.
func TestDispatchPrepare(t *testing.T) {
	etc, runDir := t.TempDir(), t.TempDir()
	file := writeApp(t, etc, "web.toml", keepGoodApp)
	snap := filepath.Join(runDir, "web.toml")

	if code, out, errOut := runCohort(t, nil, "dispatch-prepare", "--running-dir", runDir, file); code != 0 || out+errOut != "" {
		t.Fatalf("valid file: exit %d, %q %q", code, out, errOut)
	}
	if got := readFile(t, snap); got != keepGoodApp {
		t.Errorf("snapshot = %q, want the file's bytes", got)
	}
	if st, err := os.Stat(snap); err != nil || st.Mode().Perm() != 0o644 {
		t.Errorf("snapshot mode: %v %v, want 0644", st.Mode(), err)
	}

	writeApp(t, etc, "web.toml", keepBadApp)
	code, _, errOut := runCohort(t, nil, "dispatch-prepare", "--running-dir", runDir, file)
	want := file + `:2:1: unknown key "wokers" (did you mean "workers"?); keeping the running configuration of web` + "\n"
	if code != 0 || errOut != want {
		t.Errorf("broken file with a snapshot: exit %d, stderr %q; want 0, %q", code, errOut, want)
	}
	if got := readFile(t, snap); got != keepGoodApp {
		t.Errorf("the broken file replaced the snapshot: %q", got)
	}

	if code, _, errOut := runCohort(t, nil, "dispatch-prepare", "--running-dir", runDir, "--remove", file); code != 0 || errOut != "" {
		t.Errorf("--remove: exit %d, %q", code, errOut)
	}
	if _, err := os.Stat(snap); !os.IsNotExist(err) {
		t.Errorf("snapshot after --remove: %v", err)
	}
	code, _, errOut = runCohort(t, nil, "dispatch-prepare", "--running-dir", runDir, file)
	if code != 1 || !strings.Contains(errOut, file+`:2:1: unknown key "wokers"`) || !strings.Contains(errOut, "has no running configuration to keep") {
		t.Errorf("broken file, no snapshot: exit %d, stderr %q; want 1 and the error", code, errOut)
	}
	if code, _, _ := runCohort(t, nil, "dispatch-prepare", "--running-dir", runDir, "--remove", file); code != 0 {
		t.Errorf("--remove without a snapshot: exit %d", code)
	}
}

// TestLoadRunning: the dispatcher runs the recorded configuration, not
// the file (which may be broken), and a reload the candidate that
// dispatch-reload validated; with nothing recorded it reads the file.
func TestLoadRunning(t *testing.T) {
	etc, runDir := t.TempDir(), t.TempDir()
	file := writeApp(t, etc, "web.toml", keepBadApp)
	if _, err := loadRunning(runDir, file, running.Load); err == nil {
		t.Fatal("loaded a broken file with nothing recorded")
	}
	writeApp(t, runDir, "web.toml", strings.Replace(keepGoodApp, "600", "601", 1))
	app, err := loadRunning(runDir, file, running.Load)
	if err != nil || app.Command[1] != "601" || app.Path != file {
		t.Fatalf("snapshot: %+v %v", app, err)
	}
	writeApp(t, runDir, "web.toml.next", strings.Replace(keepGoodApp, "600", "602", 1))
	if app, err := loadRunning(runDir, file, running.LoadCandidate); err != nil || app.Command[1] != "602" {
		t.Errorf("candidate: %+v %v", app, err)
	}
	if app, err := loadRunning(runDir, file, running.Load); err != nil || app.Command[1] != "601" {
		t.Errorf("start with a candidate left over: %+v %v; want the snapshot", app, err)
	}
}

// TestDispatchReloadRefusesBrokenFile: ExecReload= with a broken file
// fails with its file:line:col error before asking the dispatcher, whose
// workers stay as they were; a valid file reloads and becomes the
// running configuration. (Issue 13.2: before, a broken file was the
// dispatcher's to find, or not.)
func TestDispatchReloadRefusesBrokenFile(t *testing.T) {
	_, stderr, _ := startCohortRun(t, "--listen", "http=127.0.0.1:0", "--workers", "1", "--ready", "exec", "--name", "web", "--", "/bin/sleep", "600")
	waitListening(t, stderr, "all 1 workers ready")
	m := controlRE.FindStringSubmatch(stderr.String())
	if m == nil {
		t.Fatalf("cohort run did not print its control socket:\n%s", stderr)
	}
	sock := m[1]
	generation := func() int {
		t.Helper()
		code, out, errOut := runCohort(t, nil, "status", "--json", "--socket", sock)
		var st control.Status
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			t.Fatalf("status --json: %d %s\n%s", code, errOut, out)
		}
		return st.Generation
	}

	etc := t.TempDir()
	file := writeApp(t, etc, "web.toml", keepBadApp)
	code, _, errOut := runCohort(t, nil, "dispatch-reload", "--socket", sock, file)
	if code != 1 || !strings.Contains(errOut, file+`:2:1: unknown key "wokers" (did you mean "workers"?)`) || !strings.Contains(errOut, "reload refused") {
		t.Errorf("broken file: exit %d, stderr %q; want 1 and the file's error", code, errOut)
	}
	if g := generation(); g != 1 {
		t.Errorf("generation %d after a refused reload; want 1 (workers untouched)", g)
	}

	runDir := t.TempDir()
	writeApp(t, etc, "web.toml", keepGoodApp)
	if code, out, errOut := runCohort(t, nil, "dispatch-reload", "--socket", sock, "--running-dir", runDir, file); code != 0 {
		t.Fatalf("valid file: exit %d %s %s", code, out, errOut)
	}
	if g := generation(); g != 2 {
		t.Errorf("generation %d after the reload; want 2", g)
	}
	if got := readFile(t, filepath.Join(runDir, "web.toml")); got != keepGoodApp {
		t.Errorf("running configuration after the reload: %q", got)
	}
	if _, err := os.Stat(filepath.Join(runDir, "web.toml.next")); !os.IsNotExist(err) {
		t.Errorf("candidate left after the reload: %v", err)
	}
}

// TestReloadRefusesBrokenFile: `cohort reload APP` names the broken file
// and its first error instead of asking systemd (which would answer
// "Unit not found" for an app that never ran).
func TestReloadRefusesBrokenFile(t *testing.T) {
	etc := t.TempDir()
	file := writeApp(t, etc, "web.toml", keepBadApp)
	code, _, errOut := runCohort(t, []string{etc}, "reload", "web")
	want := "cohort reload: " + file + `:2:1: unknown key "wokers" (did you mean "workers"?)`
	if code != 1 || !strings.HasPrefix(errOut, want) {
		t.Errorf("exit %d, stderr %q; want 1 and %q", code, errOut, want)
	}
}

// TestStatusShowsBrokenFile: the dispatcher notices that its app file no
// longer validates, and its status line (STATUS=, `cohort status`, text
// and JSON) names the file and its first error while the workers keep
// running; after the fix the mark goes away.
func TestStatusShowsBrokenFile(t *testing.T) {
	etc, port := t.TempDir(), freePort(t)
	good := strings.Replace(keepGoodApp, "18080", port, 1)
	file := writeApp(t, etc, "web.toml", good)
	_, stderr, _ := startCohortRun(t, file)
	waitListening(t, stderr, "all 1 workers ready")
	m := controlRE.FindStringSubmatch(stderr.String())
	if m == nil {
		t.Fatalf("cohort run did not print its control socket:\n%s", stderr)
	}
	sock := m[1]
	writeApp(t, etc, "web.toml", strings.Replace(keepBadApp, "18080", port, 1))
	want := "config: " + file + `:2:1: unknown key "wokers" (did you mean "workers"?); running the last good configuration`
	var st map[string]any
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, out, errOut := runCohort(t, nil, "status", "--json", "--socket", sock)
		st = nil
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			t.Fatalf("status --json: %d %s\n%s", code, errOut, out)
		}
		if line, _ := st["line"].(string); strings.Contains(line, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status line never named the broken file: %v", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got, _ := st["config_error"].(string); !strings.HasPrefix(got, file+`:2:1: unknown key "wokers"`) {
		t.Errorf("status --json config_error = %q", got)
	}
	if code, out, _ := runCohort(t, nil, "status", "--socket", sock); code != 0 || !strings.Contains(out, want) {
		t.Errorf("status text:\n%s", out)
	}
	writeApp(t, etc, "web.toml", good)
	deadline = time.Now().Add(15 * time.Second)
	for {
		_, out, _ := runCohort(t, nil, "status", "--socket", sock)
		if !strings.Contains(out, "config:") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status still names the fixed file:\n%s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
