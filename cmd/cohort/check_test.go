package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/dispatcher"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// checkLines runs cohort check and returns its exit code and stderr, less
// the note printed when systemd-analyze is missing (the tests that need
// it say so with testtool.Need).
func checkLines(t *testing.T, args ...string) (int, string) {
	t.Helper()
	code, _, errOut := runCohort(t, nil, append([]string{"check"}, args...)...)
	var keep []string
	for _, l := range strings.SplitAfter(errOut, "\n") {
		if !strings.HasPrefix(l, "cohort check: systemd-analyze not found") {
			keep = append(keep, l)
		}
	}
	return code, strings.Join(keep, "")
}

const listen = "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"

// TestCheckCommand: a command that the service would not find or could
// not run is an error at command[0], a warning with --offline. On 57c59ff
// check accepted all of these.
func TestCheckCommand(t *testing.T) {
	dir := t.TempDir()
	notExec := writeApp(t, dir, "server", "#!/bin/sh\n")
	bin := t.TempDir()
	writeApp(t, bin, "myserver", "#!/bin/sh\n")
	if err := os.Chmod(filepath.Join(bin, "myserver"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, body, want string
	}{
		{"missing", "command = [\"/opt/nothing/here\", \"x\"]\n" + listen,
			`:1:12: command[0] "/opt/nothing/here" does not exist on this host`},
		{"not executable", "command = [\"" + notExec + "\"]\n" + listen,
			`:1:12: command[0] "` + notExec + `" is not an executable file`},
		{"not on PATH", "\n  command = [\"cohort-no-such-program\"]\n" + listen,
			`:2:14: command[0] "cohort-no-such-program": not found in PATH ` + dispatcher.ServicePATH + ` on this host`},
		{"on the app's own PATH", "command = [\"myserver\"]\nenvironment = { PATH = \"" + bin + "\" }\n" + listen, ""},
		{"missing environment file", "command = [\"/bin/sh\"]\nenvironment_file = \"/nonexistent/web.env\"\n" + listen,
			`:2:1: environment_file: open /nonexistent/web.env: no such file or directory`},
		{"optional environment file", "command = [\"/bin/sh\"]\nenvironment_file = \"-/nonexistent/web.env\"\n" + listen, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := writeApp(t, t.TempDir(), "web.toml", tc.body)
			code, errOut := checkLines(t, file)
			want := ""
			if tc.want != "" {
				want = file + tc.want + "\n"
			}
			if code != map[bool]int{true: 0, false: 1}[tc.want == ""] || errOut != want {
				t.Errorf("code %d, stderr\n%s\nwant\n%s", code, errOut, want)
			}
			if tc.want == "" {
				return
			}
			code, errOut = checkLines(t, "--offline", file)
			want = file + strings.Replace(tc.want, ": ", ": warning: ", 1) + "\n"
			if code != 0 || errOut != want {
				t.Errorf("--offline: code %d, stderr\n%s\nwant\n%s", code, errOut, want)
			}
		})
	}
}

// TestCheckDirectives: a pass-through directive that this host's systemd
// does not know, or whose value it refuses, is reported at its TOML line
// from what the real systemd-analyze verify says, with a suggestion from
// the directives systemd lists itself. On 57c59ff check accepted them.
func TestCheckDirectives(t *testing.T) {
	testtool.Need(t, "systemd-analyze")
	body := "command = [\"/bin/sh\"]\n" + listen +
		"[unit]\nAfterr = \"network.target\"\n" +
		"[service]\nLimitNOFILE = 65536\n  MemoryMx = \"1G\"\nLimitCORE = \"lots\"\n" +
		"[socket]\nXYZZY = 1\n"
	file := writeApp(t, t.TempDir(), "web.toml", body)
	want := []string{
		file + `:6:1: [unit] Afterr: systemd does not know this directive (did you mean "After"?)`,
		file + `:9:3: [service] MemoryMx: systemd does not know this directive (did you mean "MemoryMax"?)`,
		// systemd words its value errors differently from release to
		// release: the test pins the place and the value.
		file + `:10:1: [service] LimitCORE: systemd-analyze verify: `,
		file + `:12:1: [socket] XYZZY: systemd does not know this directive`,
	}
	code, errOut := checkLines(t, file)
	lines := strings.Split(strings.TrimSuffix(errOut, "\n"), "\n")
	if code != 1 || len(lines) != len(want) {
		t.Fatalf("code %d, stderr\n%s\nwant\n%s", code, errOut, strings.Join(want, "\n"))
	}
	for i, w := range want {
		if i == 2 && (!strings.HasPrefix(lines[i], w) || !strings.Contains(lines[i], "lots")) || i != 2 && lines[i] != w {
			t.Errorf("line %d:\n%s\nwant\n%s", i+1, lines[i], w)
		}
	}
	code, errOut = checkLines(t, "--offline", file)
	if code != 0 || strings.Count(errOut, ": warning: ") != len(want) {
		t.Errorf("--offline: code %d, stderr\n%s", code, errOut)
	}
	// Known directives pass.
	good := writeApp(t, t.TempDir(), "web.toml", "command = [\"/bin/sh\"]\n"+listen+"[service]\nMemoryMax = \"1G\"\n")
	if code, errOut := checkLines(t, good); code != 0 || errOut != "" {
		t.Errorf("known directive: code %d, stderr\n%s", code, errOut)
	}
}

// TestCheckFIFO: cohort check on an app file that is a FIFO returns at
// once with an error instead of blocking in open (as on 57c59ff).
func TestCheckFIFO(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "web.toml")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	type result struct {
		code   int
		stderr string
	}
	done := make(chan result, 1)
	go func() {
		code, _, errOut := runCohort(t, nil, "check", fifo)
		done <- result{code, errOut}
	}()
	select {
	case r := <-done:
		want := "read app file: " + fifo + ": not a regular file (a FIFO)\n"
		if r.code != 1 || r.stderr != want {
			t.Errorf("code %d, stderr %q; want %q", r.code, r.stderr, want)
		}
	case <-time.After(5 * time.Second):
		// Open the FIFO for writing so that the blocked open returns
		// and the goroutine ends.
		if w, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			w.Close()
		}
		<-done
		t.Fatal("cohort check on a FIFO blocked for 5 s")
	}
}

// TestCheckMetrics: check reports a [metrics] table's errors at their
// keys, and names the metrics listener of a good file.
func TestCheckMetrics(t *testing.T) {
	bad := writeApp(t, t.TempDir(), "web.toml", "command = [\"/bin/sh\"]\ndrain_delay = \"1h\"\n"+listen+"[metrics]\nlisten = \"127.0.0.1:8080\"\n")
	code, errOut := checkLines(t, bad)
	for _, want := range []string{
		`web.toml:2:1: drain_delay: want at most 10m0s, got "1h"`,
		`web.toml:7:1: metrics listen "127.0.0.1:8080" is already used by listener 1`,
	} {
		if code != 1 || !strings.Contains(errOut, want) {
			t.Errorf("exit %d, stderr %q; want 1 and %q", code, errOut, want)
		}
	}
	good := writeApp(t, t.TempDir(), "web.toml", "command = [\"/bin/sh\"]\n"+listen+"[metrics]\nlisten = \"127.0.0.1:9464\"\n")
	code, out, errOut := runCohort(t, nil, "check", good)
	if code != 0 || !strings.Contains(out, "metrics on 127.0.0.1:9464") {
		t.Errorf("exit %d, stdout %q, stderr %q; want 0 and the metrics listener named", code, out, errOut)
	}
}

// TestCheckControllers: [limits] that need a cgroup controller this host
// does not offer its services are an error at the first key that needs
// it (a warning with --offline): the dispatcher would refuse the app at
// its start. Before, check said "ok" and only the start failed.
func TestCheckControllers(t *testing.T) {
	body := "command = [\"/bin/sh\"]\n" + listen + "[limits]\ncpu_quota = \"50%\"\nmemory_max = \"256M\"\n"
	file := writeApp(t, t.TempDir(), "web.toml", body)
	withControllers := func(list string) string {
		root := t.TempDir()
		if list != "-" {
			writeApp(t, root, "cgroup.controllers", list+"\n")
		}
		return root
	}
	for _, tc := range []struct {
		name, controllers, want string
	}{
		{"all there", "cpuset cpu io memory pids", ""},
		{"no memory", "cpu pids", ":7:1: [limits] need the memory controller, which this host does not offer its services (ROOT offers: cpu pids): the app would be refused when it starts"},
		{"no cgroup2", "-", ":6:1: [limits] need the cpu controller, which this host does not offer its services (no cgroup2 hierarchy at ROOT, which offers: none): the app would be refused when it starts\n" +
			"FILE:7:1: [limits] need the memory controller, which this host does not offer its services (no cgroup2 hierarchy at ROOT, which offers: none): the app would be refused when it starts"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := withControllers(tc.controllers)
			for _, offline := range []bool{false, true} {
				var out, errOut bytes.Buffer
				env := &environment{stdout: &out, stderr: &errOut, cgroupRoot: root}
				args := []string{"check", file}
				if offline {
					args = []string{"check", "--offline", file}
				}
				code := runMain(context.Background(), env, args)
				got := ""
				for _, l := range strings.SplitAfter(errOut.String(), "\n") {
					if !strings.HasPrefix(l, "cohort check: systemd-analyze not found") {
						got += l
					}
				}
				want, wantCode := "", 0
				if tc.want != "" {
					want, wantCode = file+strings.NewReplacer("ROOT", root, "FILE", file).Replace(tc.want)+"\n", 1
					if offline {
						want, wantCode = strings.ReplaceAll(want, ": [limits]", ": warning: [limits]"), 0
					}
				}
				if code != wantCode || got != want {
					t.Errorf("offline %v: code %d, stderr\n%s\nwant code %d,\n%s", offline, code, got, wantCode, want)
				}
			}
		})
	}
}
