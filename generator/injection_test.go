package generator

import (
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
)

// TestUnitNamesCheckedBeforeWriting: app + listener names that make a
// unit name longer than systemd's 255 bytes used to pass check, and
// generate failed after writing some units (issue 14, item 8). The config
// now bounds the app name; an App built some other way fails in Render,
// before anything is written.
func TestUnitNamesCheckedBeforeWriting(t *testing.T) {
	app, err := appfile.Parse("/etc/cohort/web.toml", []byte("command = [\"/bin/app\"]\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n[[listen]]\nname = \""+
		strings.Repeat("l", 64)+"\"\naddress = \"127.0.0.1:8081\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	app.Name = strings.Repeat("a", 200)
	us, err := Render(app, Options{CPUs: 2})
	if err == nil || !strings.Contains(err.Error(), "longer than systemd's limit of 255") {
		t.Fatalf("Render = %v, %v; want the unit name refused", us, err)
	}
}

// TestEscapesSpecifiersInAddress: '%' in an address is escaped in
// Description= as in ListenStream= (issue 14, item 1: it was not in
// Description=).
func TestEscapesSpecifiersInAddress(t *testing.T) {
	app, err := appfile.Parse("/etc/cohort/web.toml", []byte("command = [\"/bin/app\"]\n[[listen]]\nname = \"http\"\naddress = \"/run/100%n.sock\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	us, err := Render(app, Options{})
	if err != nil {
		t.Fatal(err)
	}
	sock := string(us.Files[0].Content)
	for _, want := range []string{"Description=cohort app web: listener http on /run/100%%n.sock\n", "ListenStream=/run/100%%n.sock\n"} {
		if !strings.Contains(sock, want) {
			t.Errorf("web.socket lacks %q:\n%s", want, sock)
		}
	}
}

// TestTimeoutMarginsSaturate: TimeoutStartSec= and TimeoutStopSec= add a
// margin to the app's timeouts; a sum that overflowed went negative and
// the directive vanished (issue 14, item 8).
func TestTimeoutMarginsSaturate(t *testing.T) {
	app, err := appfile.Parse("/etc/cohort/web.toml", []byte("command = [\"/bin/app\"]\nstop_timeout = \"365d\"\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	us, err := Render(app, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if svc := string(us.Files[1].Content); !strings.Contains(svc, "TimeoutStopSec=31536010s\n") {
		t.Errorf("web.service lacks TimeoutStopSec=31536010s:\n%s", svc)
	}
	app.StopTimeout = math.MaxInt64 - time.Second // not from a file
	us, err = Render(app, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if svc := string(us.Files[1].Content); !strings.Contains(svc, "TimeoutStopSec=9223372036854ms\n") {
		t.Errorf("web.service lacks a saturated TimeoutStopSec=:\n%s", svc)
	}
}

// TestGeneratorSkipsHostileApp: the generator refuses an app whose
// address would inject a directive, writes none of its units, and still
// writes the good app's.
func TestGeneratorSkipsHostileApp(t *testing.T) {
	etc, out := t.TempDir(), t.TempDir()
	good := "command = [\"/bin/app\"]\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"
	if err := os.WriteFile(etc+"/good.toml", []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	bad := "command = [\"/bin/app\"]\n[service]\nEnvironment = \"A=1\\u0000User=root\"\n[[listen]]\nname = \"http\"\naddress = \"/run/a.sock\\nExecStartPre=/usr/bin/touch /run/pwned\"\n"
	if err := os.WriteFile(etc+"/evil.toml", []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	var log strings.Builder
	g := &Generator{SearchPath: []string{etc}, Log: &log}
	if err := g.Run(out); err == nil {
		t.Error("Run succeeded with a hostile app")
	}
	for _, want := range []string{etc + "/evil.toml:3:1: [service] Environment = \"A=1\\x00User=root\" holds the control character NUL",
		etc + "/evil.toml:6:1: address \"/run/a.sock\\nExecStartPre=/usr/bin/touch /run/pwned\" holds the control character newline"} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, log.String())
		}
	}
	if got := strings.Join(listTree(t, out), " "); got != "good.service good.socket" {
		t.Errorf("output holds %s", got)
	}
}
