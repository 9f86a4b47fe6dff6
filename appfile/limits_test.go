package appfile

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestErrorCap: a file of many unknown keys reports the first MaxErrors in
// file order and one line counting the rest, whatever order the checks
// found them in. On 57c59ff every one was printed.
func TestErrorCap(t *testing.T) {
	var b strings.Builder
	for i := range 3000 {
		fmt.Fprintf(&b, "unknown%d = 1\n", i)
	}
	_, err := Parse("/etc/cohort/web.toml", []byte(b.String()))
	var errs Errors
	if !errors.As(err, &errs) {
		t.Fatalf("err = %v", err)
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != MaxErrors+1 {
		t.Fatalf("%d lines, want %d:\n%s", len(lines), MaxErrors+1, err)
	}
	// The missing command and [[listen]] are found last, after all the
	// unknown keys, but they are at 1:1 and so among the first.
	want := []string{
		`/etc/cohort/web.toml:1:1: unknown key "unknown0"`,
		`/etc/cohort/web.toml:1:1: missing required key "command" (e.g. command = ["/usr/bin/node", "server.js"])`,
		`/etc/cohort/web.toml:1:1: missing [[listen]]: an app needs at least one listening socket`,
		`/etc/cohort/web.toml:2:1: unknown key "unknown1"`,
	}
	for i, w := range want {
		if lines[i] != w {
			t.Errorf("line %d = %q, want %q", i+1, lines[i], w)
		}
	}
	if last := lines[MaxErrors]; last != "/etc/cohort/web.toml: … and 2982 more errors" {
		t.Errorf("last line = %q", last)
	}
}

// TestUnitBounds: the limits on what one app may make the generator write
// are refused at the key that passes them.
func TestUnitBounds(t *testing.T) {
	listen := func(n int) string {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "[[listen]]\nname = \"l%d\"\naddress = \"127.0.0.1:%d\"\n", i, 1000+i)
		}
		return b.String()
	}
	tests := []struct {
		name, src, want string
	}{
		{"listeners", "command = [\"/bin/app\"]\n" + listen(MaxListeners+1),
			fmt.Sprintf("/etc/cohort/web.toml:%d:1: listen: more than 32 listeners", 2+3*MaxListeners)},
		{"reuseport workers × listeners", "command = [\"/bin/app\"]\nmode = \"reuseport\"\nworkers = 1024\n" + listen(2),
			`/etc/cohort/web.toml:3:1: mode = "reuseport" writes one socket unit per worker and listener: 1024 workers × 2 listeners = 2048, more than 1024`},
		{"directives", "command = [\"/bin/app\"]\n" + listen(1) + "[service]\nEnvironment = [" + strings.Repeat("\"A=1\", ", MaxDirectives) + "\"B=2\"]\n",
			`/etc/cohort/web.toml:6:1: [service]: more than 256 directives`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("/etc/cohort/web.toml", []byte(tt.src))
			if err == nil || err.Error() != tt.want {
				t.Errorf("got  %v\nwant %s", err, tt.want)
			}
		})
	}
	ok := "command = [\"/bin/app\"]\nmode = \"reuseport\"\nworkers = 512\n" + listen(2)
	if _, err := Parse("/etc/cohort/web.toml", []byte(ok)); err != nil {
		t.Errorf("512 workers × 2 listeners: %v", err)
	}
}
