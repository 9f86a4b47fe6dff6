package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCheckHostile: `cohort check` refuses what used to pass and fail
// later (issue 14, item 8), each with file:line:col.
func TestCheckHostile(t *testing.T) {
	dir := t.TempDir()
	long := strings.Repeat("a", 67)
	for _, tt := range []struct{ name, body, want string }{
		{"wd.toml", "command = [\"/bin/app\"]\nworking_directory = \"/nonexistent/cohort-test\"\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n",
			`wd.toml:2:1: working_directory "/nonexistent/cohort-test" does not exist on this host`},
		{long + ".toml", goodApp, long + `.toml:1:1: app name "` + long + `" is 67 characters long; at most 66 fit`},
		{"nul.toml", "command = [\"/bin/app\", \"a\\u0000b\"]\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n",
			`nul.toml:1:24: command[1] "a\x00b" holds the control character NUL (\0) at byte 1`},
		{"dur.toml", "command = [\"/bin/app\"]\nstop_timeout = \"9223372036s\"\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n",
			`dur.toml:2:1: stop_timeout: "9223372036s" is longer than the longest duration cohort accepts, 365 days`},
	} {
		p := writeApp(t, dir, tt.name, tt.body)
		code, _, errOut := runCohort(t, nil, "check", p)
		if code != 1 || !strings.HasPrefix(errOut, filepath.Join(dir, tt.want)) {
			t.Errorf("check %s: code %d\nstderr %s\nwant   %s…", tt.name, code, errOut, filepath.Join(dir, tt.want))
		}
	}
}

// TestGenerateHostileDirectory: `cohort generate` of an app file in a
// directory named "d\nExecStartPre=…" used to write that line into
// SourcePath=, the header and ExecStart= (issue 14, item 1). It refuses,
// writes nothing, and the message does not forge a log line.
func TestGenerateHostileDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "d\nExecStartPre=/usr/bin/touch /run/pwned")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	app := writeApp(t, dir, "web.toml", goodApp)
	out := t.TempDir()
	code, stdout, errOut := runCohort(t, nil, "generate", "--dir", out, app)
	if code != 1 || !strings.Contains(errOut, `the app file's path holds the control character newline (\n)`) || strings.Count(errOut, "\n") != 1 {
		t.Errorf("generate: code %d\nstdout %s\nstderr %s", code, stdout, errOut)
	}
	if entries, _ := os.ReadDir(out); len(entries) > 0 {
		t.Errorf("generate wrote %d files", len(entries))
	}
}
