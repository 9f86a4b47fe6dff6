package appfile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestParseHostile: every string that can reach a unit file or a
// worker's execve refuses control characters, with the key's
// file:line:col (issue 14, item 1), and what `cohort check` used to accept
// but failed later is refused up front (item 8). Each of these was
// accepted at 57c59ff.
func TestParseHostile(t *testing.T) {
	const cmd = "command = [\"/bin/app\"]\n"
	tests := []struct {
		name string
		src  string
		want string // the one error, in full
	}{
		{"newline in unix address", cmd + "[[listen]]\nname = \"http\"\naddress = \"/run/a.sock\\nExecStartPre=/usr/bin/touch /run/pwned\"\n",
			`web.toml:4:1: address "/run/a.sock\nExecStartPre=/usr/bin/touch /run/pwned" holds the control character newline (\n) at byte 11; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"carriage return in abstract address", cmd + "[[listen]]\nname = \"http\"\naddress = \"@a\\rExecStartPre=/bin/x\"\n",
			`web.toml:4:1: address "@a\rExecStartPre=/bin/x" holds the control character carriage return (\r) at byte 2; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"NUL in IPv6 zone", cmd + "[[listen]]\nname = \"http\"\naddress = \"[fe80::1%eth0\\u0000x]:80\"\n",
			`web.toml:4:1: address "[fe80::1%eth0\x00x]:80" holds the control character NUL (\0) at byte 13; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"IPv6 zone, which systemd cannot bind", cmd + "[[listen]]\nname = \"http\"\naddress = \"[fe80::1%eth0]:80\"\n",
			`web.toml:4:1: address "[fe80::1%eth0]:80": systemd's ListenStream= takes no IPv6 zone (%eth0); write the address without it and add [socket] BindToDevice = "eth0"`},
		{"unix address ends with a backslash", cmd + "[[listen]]\nname = \"http\"\naddress = '/run/a\\'\n",
			`web.toml:4:1: unix socket address "/run/a\\" ends with a backslash, which continues the line in a unit file`},
		{"unix address ends with a space", cmd + "[[listen]]\nname = \"http\"\naddress = '/run/a.sock '\n",
			`web.toml:4:1: unix socket address "/run/a.sock " starts or ends with whitespace, which systemd strips`},
		{"NUL in pass-through value", cmd + "[service]\nEnvironment = \"A=1\\u0000User=root\"\n" + listenHTTP,
			`web.toml:3:1: [service] Environment = "A=1\x00User=root" holds the control character NUL (\0) at byte 3; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"TAB in pass-through value", cmd + "[unit]\nDescription = \"a\\tb\"\n" + listenHTTP,
			`web.toml:3:1: [unit] Description = "a\tb" holds the control character TAB (\t) at byte 1; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"DEL in pass-through array value", cmd + "[service]\nReadWritePaths = [\"/var/a\", \"/var/b\\u007f\"]\n" + listenHTTP,
			`web.toml:3:1: [service] ReadWritePaths = "/var/b\x7f" holds the control character U+007F at byte 6; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"pass-through value continues the line", cmd + "[unit]\nDescription = 'web \\'\n" + listenHTTP,
			`web.toml:3:1: [unit] Description = "web \\" ends with a backslash, which continues the line in a unit file`},
		{"pass-through value with leading space", cmd + "[service]\nLimitNOFILE = \" 1024\"\n" + listenHTTP,
			`web.toml:3:1: [service] LimitNOFILE = " 1024" starts or ends with whitespace, which systemd strips`},
		{"NUL in a command argument", "command = [\"/bin/app\", \"--a\\u0000b\"]\n" + listenHTTP,
			`web.toml:1:24: command[1] "--a\x00b" holds the control character NUL (\0) at byte 3; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"newline in the program", "command = [\"/bin/app\\nx\"]\n" + listenHTTP,
			`web.toml:1:12: command[0] "/bin/app\nx" holds the control character newline (\n) at byte 8; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"NUL in an environment value", cmd + "environment = { A = \"1\\u0000B=2\" }\n" + listenHTTP,
			`web.toml:2:17: environment.A "1\x00B=2" holds the control character NUL (\0) at byte 1; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"newline in an environment file", cmd + "environment_file = \"/etc/a\\nb\"\n" + listenHTTP,
			`web.toml:2:1: environment_file "/etc/a\nb" holds the control character newline (\n) at byte 6; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"newline in working_directory", cmd + "working_directory = \"/srv\\n\"\n" + listenHTTP,
			`web.toml:2:1: working_directory "/srv\n" holds the control character newline (\n) at byte 4; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"newline in user", cmd + "user = \"web\\nGroup=root\"\n" + listenHTTP,
			`web.toml:2:1: user "web\nGroup=root" holds the control character newline (\n) at byte 3; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"newline in socket_group", cmd + "[[listen]]\nname = \"s\"\naddress = \"/run/s.sock\"\nsocket_group = \"www\\n\"\n",
			`web.toml:5:1: socket_group "www\n" holds the control character newline (\n) at byte 3; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"newline in a listener name", cmd + "[[listen]]\nname = \"a\\nb\"\naddress = \"127.0.0.1:80\"\n",
			`web.toml:3:1: name "a\nb" holds the control character newline (\n) at byte 1; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},
		{"C1 control in mode", cmd + "mode = \"shared\\u0085\"\n" + listenHTTP,
			`web.toml:2:1: mode "shared\u0085" holds the control character U+0085 at byte 6; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`},

		// Item 8: durations that overflowed.
		{"seconds that overflow", cmd + "ready_timeout = \"10000000000\"\n" + listenHTTP,
			`web.toml:2:1: ready_timeout: duration "10000000000" is too long`},
		{"stop_timeout that drops TimeoutStopSec=", cmd + "stop_timeout = \"9223372036s\"\n" + listenHTTP,
			`web.toml:2:1: stop_timeout: "9223372036s" is longer than the longest duration cohort accepts, 365 days`},
		{"systemd-style sum that overflows", cmd + "[restart]\nmax = \"200000w 200000w\"\n" + listenHTTP,
			`web.toml:3:1: restart.max: duration "200000w 200000w" is too long`},
		{"NaN seconds", cmd + "watchdog = \"NaN\"\n" + listenHTTP,
			`web.toml:2:1: watchdog: invalid duration "NaN" (write e.g. "30s", "1min 30s", "500ms")`},
		{"ready delay too long", cmd + "ready = \"400d\"\n" + listenHTTP,
			`web.toml:2:1: ready: "400d" is longer than the longest duration cohort accepts, 365 days`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			app, err := Parse("/etc/cohort/web.toml", []byte(tt.src))
			if err == nil {
				t.Fatalf("Parse accepted it: %+v", app)
			}
			if got, want := err.Error(), "/etc/cohort/"+tt.want; got != want {
				t.Errorf("\n got %s\nwant %s", got, want)
			}
		})
	}
}

// TestParseKeepsTabsInExecValues: a TAB in a command argument or an
// environment value is data for execve, never in a unit file.
func TestParseKeepsTabsInExecValues(t *testing.T) {
	app, err := Parse("/etc/cohort/web.toml", []byte("command = [\"/bin/app\", \"a\\tb\"]\nenvironment = { SEP = \"\\t\" }\n"+listenHTTP))
	if err != nil {
		t.Fatal(err)
	}
	if app.Command[1] != "a\tb" || app.Environment["SEP"] != "\t" {
		t.Errorf("got %q, %q", app.Command, app.Environment)
	}
}

// TestParseHostilePath: the app file's directory goes into SourcePath=,
// the header comment and ExecStart=; a directory named
// "d\nExecStartPre=…" is refused, and the error does not forge a log line.
func TestParseHostilePath(t *testing.T) {
	path := "/tmp/d\nExecStartPre=/usr/bin/touch /run/pwned/web.toml"
	_, err := Parse(path, []byte(minimal))
	if err == nil {
		t.Fatal("Parse accepted the path")
	}
	want := `"/tmp/d\nExecStartPre=/usr/bin/touch /run/pwned/web.toml":1:1: the app file's path holds the control character newline (\n) at byte 6; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)`
	if got := err.Error(); got != want {
		t.Errorf("\n got %s\nwant %s", got, want)
	}
}

// TestAppNameBound: the longest app name is the one whose notify socket
// path still fits sun_path (issue 14, item 8: 67 to 200 characters used to
// pass check and fail in the dispatcher).
func TestAppNameBound(t *testing.T) {
	if MaxAppName != 66 {
		t.Errorf("MaxAppName = %d, want 66", MaxAppName)
	}
	longest := RuntimeRoot + strings.Repeat("a", MaxAppName) + "/notify-4194304-ffffffff.sock"
	if len(longest)+1 != SunPathMax {
		t.Errorf("longest socket path is %d bytes with its NUL, want %d", len(longest)+1, SunPathMax)
	}
	ok := strings.Repeat("a", MaxAppName)
	if _, err := Parse("/etc/cohort/"+ok+".toml", []byte(minimal)); err != nil {
		t.Errorf("a %d-character name: %v", len(ok), err)
	}
	long := strings.Repeat("a", MaxAppName+1)
	_, err := Parse("/etc/cohort/"+long+".toml", []byte(minimal))
	want := "/etc/cohort/" + long + ".toml:1:1: app name \"" + long + "\" is 67 characters long; at most 66 fit (its socket path /run/cohort/<app>/ + a 28-byte socket name must fit the 108 bytes of a unix socket address)"
	if err == nil || err.Error() != want {
		t.Errorf("\n got %v\nwant %s", err, want)
	}
}

// TestCheckHost: a working_directory that does not exist is an error at
// its key (it made the dispatcher retry forking forever).
func TestCheckHost(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ wd, want string }{
		{dir, ""},
		{dir + "/missing", `/etc/cohort/web.toml:2:1: working_directory "` + dir + `/missing" does not exist on this host`},
		{file, `/etc/cohort/web.toml:2:1: working_directory "` + file + `" is not a directory`},
	} {
		app, err := Parse("/etc/cohort/web.toml", []byte(minimal[:strings.Index(minimal, "\n")+1]+"working_directory = \""+tt.wd+"\"\n"+listenHTTP))
		if err != nil {
			t.Fatal(err)
		}
		err = CheckHost(app)
		var errs Errors
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("%s: %v", tt.wd, err)
		case tt.want != "" && (err == nil || err.Error() != tt.want || !errors.As(err, &errs)):
			t.Errorf("%s:\n got %v\nwant %s", tt.wd, err, tt.want)
		}
	}
	if err := CheckHost(New("web")); err != nil {
		t.Errorf("no working_directory: %v", err)
	}
}

// TestParseDurationBounds: what overflowed time.Duration is an error, not
// a negative or wrapped value.
func TestParseDurationBounds(t *testing.T) {
	for _, s := range []string{"10000000000", "9223372037", "1e3", "0x10", "Inf", "+5", "300000w", "106751d 1d"} {
		if d, err := ParseDuration(s); err == nil {
			t.Errorf("ParseDuration(%q) = %v, want an error", s, d)
		}
	}
	for s, want := range map[string]time.Duration{"9223372036": 9223372036 * time.Second, "1.5": 1500 * time.Millisecond, "2w": 14 * 24 * time.Hour, ".5": 500 * time.Millisecond} {
		if d, err := ParseDuration(s); err != nil || d != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", s, d, err, want)
		}
	}
}
