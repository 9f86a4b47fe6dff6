package sockets

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/activation"
	"github.com/cohort-dev/cohort/appfile"
	"golang.org/x/sys/unix"
)

// named returns real fds, named as activation.Files.TakeAll names them;
// only the names matter to the matching. Each *os.File owns its fd: a
// second File on one fd would close it from its finalizer, under the feet
// of whatever reused the number. They are closed when t ends.
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

func TestMatch(t *testing.T) {
	app := appfile.New("web")
	app.Path = "/etc/cohort/web.toml"
	app.Listen = []appfile.Listener{{Name: "http", Address: ":80"}, {Name: "admin", Address: "127.0.0.1:81"}}

	files := named(t, "admin", "http")
	got, err := Match(app, files)
	if err != nil || got[0] != files[1] || got[1] != files[0] {
		t.Errorf("by name: %v, %v", got, err)
	}
	files = named(t, activation.UnnamedFD, activation.UnnamedFD)
	if got, err := Match(app, files); err != nil || got[0] != files[0] {
		t.Errorf("unnamed, by position: %v, %v", got, err)
	}
	_, err = Match(app, named(t, "http", "metrics"))
	if !errors.Is(err, ErrMismatch) {
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

// TestMatchSlots: the fds systemd passes in reuseport mode are
// grouped by the slot in their name; a missing, unknown or doubled name
// is an error that says which.
func TestMatchSlots(t *testing.T) {
	app := appfile.New("web")
	app.Mode = appfile.ModeReusePort
	app.Listen = []appfile.Listener{
		{Name: "http", Address: "127.0.0.1:80", Kind: appfile.ListenTCP},
		{Name: "v1.admin", Address: "127.0.0.1:81", Kind: appfile.ListenTCP},
	}
	for _, tc := range []struct {
		name    string
		passed  []string
		want    [][]string // names by slot
		wantErr []string
	}{
		{"in order", []string{"http.0", "v1.admin.0", "http.1", "v1.admin.1"},
			[][]string{{"http.0", "v1.admin.0"}, {"http.1", "v1.admin.1"}}, nil},
		{"any order", []string{"v1.admin.2", "http.1", "http.0", "v1.admin.0", "http.2", "v1.admin.1"},
			[][]string{{"http.0", "v1.admin.0"}, {"http.1", "v1.admin.1"}, {"http.2", "v1.admin.2"}}, nil},
		{"missing", []string{"http.0", "v1.admin.0", "http.2", "v1.admin.2"}, nil,
			[]string{`no fd "http.1" for worker 1 of [[listen]] "http" (127.0.0.1:80)`, `no fd "v1.admin.1" for worker 1`}},
		{"unknown and shared-mode names", []string{"http.0", "v1.admin.0", "http", "metrics.0"}, nil,
			[]string{`fd 5 named "http", which is no <listener>.<worker> of this app (listeners: "http", "v1.admin")`, `fd 6 named "metrics.0"`}},
		{"doubled", []string{"http.0", "v1.admin.0", "http.0"}, nil, []string{`two fds named "http.0"`}},
		{"none", nil, nil, []string{`no sockets passed (want http.0, …)`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			slots, err := MatchSlots(app, named(t, tc.passed...))
			if tc.wantErr != nil {
				if !errors.Is(err, ErrMismatch) {
					t.Fatalf("err = %v; want ErrMismatch", err)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q\ndoes not say %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got [][]string
			for _, set := range slots {
				var names []string
				for _, f := range set {
					names = append(names, f.Name())
				}
				got = append(got, names)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("slots %q; want %q", got, tc.want)
			}
		})
	}
}

// TestBindSlots: cohort run binds n listening sockets per listener, all
// with SO_REUSEPORT on the port the first one got, and the kernel
// accepts them as one group (a second bind without SO_REUSEPORT fails).
func TestBindSlots(t *testing.T) {
	app := appfile.New("web")
	app.Listen = []appfile.Listener{
		{Name: "a", Address: "127.0.0.1:0", Kind: appfile.ListenTCP},
		{Name: "b", Address: "[::1]:0", Kind: appfile.ListenTCP},
	}
	slots, err := BindSlots(app, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, set := range slots {
			for _, f := range set {
				f.Close()
			}
		}
	}()
	if len(slots) != 3 {
		t.Fatalf("%d slots; want 3", len(slots))
	}
	for k := range app.Listen {
		first := BoundAddr(slots[0][k])
		if strings.HasSuffix(first, ":0") || first == "" {
			t.Fatalf("listener %d bound to %q", k, first)
		}
		for i, set := range slots {
			if got := BoundAddr(set[k]); got != first {
				t.Errorf("slot %d listener %d on %s; want %s", i, k, got, first)
			}
			if v, err := unix.GetsockoptInt(int(set[k].Fd()), unix.SOL_SOCKET, unix.SO_REUSEPORT); err != nil || v != 1 {
				t.Errorf("slot %d listener %d: SO_REUSEPORT = %d, %v", i, k, v, err)
			}
			if set[k].Name() != app.Listen[k].Name {
				t.Errorf("slot %d listener %d named %q", i, k, set[k].Name())
			}
		}
	}
	abstract := []appfile.Listener{{Name: "a", Address: "@cohort-test-bindslots", Kind: appfile.ListenAbstract}}
	if _, err := BindSlots(&appfile.App{Listen: abstract}, 2); err == nil || !strings.Contains(err.Error(), "needs TCP") {
		t.Errorf("BindSlots of an abstract socket: %v; want a 'needs TCP' error", err)
	}
}
