package dispatcher

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/activation"
	"github.com/cohort-dev/cohort/appfile"
	"golang.org/x/sys/unix"
)

func named(t *testing.T, names ...string) []*os.File {
	var fs []*os.File
	for _, n := range names {
		fd, err := unix.Open(os.DevNull, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), n)
		fs = append(fs, f)
		t.Cleanup(func() { f.Close() })
	}
	return fs
}

func TestMatchListeners(t *testing.T) {
	app := appfile.New("web")
	app.Path = "/etc/cohort/web.toml"
	app.Listen = []appfile.Listener{{Name: "http", Address: ":80"}, {Name: "admin", Address: "127.0.0.1:81"}}

	files := named(t, "admin", "http")
	got, err := MatchListeners(app, files)
	if err != nil || got[0] != files[1] || got[1] != files[0] {
		t.Errorf("by name: %v, %v", got, err)
	}
	files = named(t, activation.UnnamedFD, activation.UnnamedFD)
	if got, err := MatchListeners(app, files); err != nil || got[0] != files[0] {
		t.Errorf("unnamed, by position: %v, %v", got, err)
	}
	_, err = MatchListeners(app, named(t, "http", "metrics"))
	if !errors.Is(err, ErrListeners) {
		t.Fatalf("mismatch: %v", err)
	}
	for _, want := range []string{"/etc/cohort/web.toml", `[[listen]] "admin"`, `fd 4 named "metrics"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestBind(t *testing.T) {
	dir := t.TempDir()
	app := appfile.New("b")
	app.Listen = []appfile.Listener{
		{Name: "tcp", Address: "127.0.0.1:0", Kind: appfile.ListenTCP, NoDelay: true},
		{Name: "unix", Address: filepath.Join(dir, "s.sock"), Kind: appfile.ListenUnix, SocketMode: 0o600},
	}
	files, cleanup, err := Bind(app)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	for _, f := range files {
		defer f.Close()
		l, err := net.FileListener(f)
		if err != nil {
			t.Fatalf("%s: %v", f.Name(), err)
		}
		l.Close()
	}
	if fi, err := os.Stat(app.Listen[1].Address); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("unix socket: %v, %v", fi, err)
	}
	// A stale socket file is replaced; cleanup removes it.
	files[1].Close()
	files2, cleanup2, err := Bind(&appfile.App{Listen: app.Listen[1:]})
	if err != nil {
		t.Fatalf("rebinding over a stale socket: %v", err)
	}
	files2[0].Close()
	cleanup2()
	if _, err := os.Stat(app.Listen[1].Address); !os.IsNotExist(err) {
		t.Errorf("cleanup left %s", app.Listen[1].Address)
	}
}

func TestBaseEnv(t *testing.T) {
	dir := t.TempDir()
	envFile := filepath.Join(dir, "env")
	os.WriteFile(envFile, []byte("# comment\nA=from-file\nQ=\"quoted \\\"x\\\"\"\n; also comment\nLONG=one \\\ntwo\n"), 0o644)
	app := appfile.New("e")
	app.Environment = map[string]string{"A": "from-toml", "B": "b"}
	app.EnvironmentFiles = []string{envFile, "-" + filepath.Join(dir, "missing")}
	env, err := baseEnv([]string{"PATH=/bin", "NOTIFY_SOCKET=/x", "LISTEN_FDS=1", "A=inherited", "WATCHDOG_USEC=1"}, app)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"PATH": "/bin", "A": "from-file", "B": "b", "Q": `quoted "x"`, "LONG": "one two"}
	for k, v := range want {
		if got := envValue(env, k); got != v {
			t.Errorf("%s=%q, want %q", k, got, v)
		}
	}
	for _, k := range []string{"NOTIFY_SOCKET", "LISTEN_FDS", "WATCHDOG_USEC"} {
		if envValue(env, k) != "" {
			t.Errorf("%s leaked", k)
		}
	}
	app.EnvironmentFiles = []string{filepath.Join(dir, "missing")}
	if _, err := baseEnv(nil, app); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("missing required file: %v", err)
	}
}
