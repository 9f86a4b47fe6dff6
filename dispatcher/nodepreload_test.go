package dispatcher

import (
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/appfile"
)

// TestNodePreloadEnv: NODE_OPTIONS gets the module first, quoted, and
// keeps what the app set; nothing for node_preload = false or
// round-robin mode; a missing module is said and left out.
func TestNodePreloadEnv(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, `my "pre\load.js`)
	if err := os.WriteFile(file, []byte("//"), 0o644); err != nil {
		t.Fatal(err)
	}
	app := appfile.New("n")
	app.NodePreload = true
	var warned []string
	warnf := func(f string, a ...any) { warned = append(warned, f) }
	got := nodePreloadEnv(app, []string{"A=1", "NODE_OPTIONS=--max-old-space-size=512", "B=2"}, file, warnf)
	want := []string{"A=1", "B=2", `NODE_OPTIONS=--require "` + dir + `/my \"pre\\load.js" --max-old-space-size=512`}
	if !slices.Equal(got, want) || warned != nil {
		t.Errorf("got %q, want %q (warned %q)", got, want, warned)
	}
	for _, a := range []func(*appfile.App){
		func(a *appfile.App) { a.NodePreload = false },
		func(a *appfile.App) { a.Mode = appfile.ModeRoundRobin },
	} {
		app := appfile.New("n")
		app.NodePreload = true
		a(app)
		if got := nodePreloadEnv(app, []string{"A=1"}, file, warnf); !slices.Equal(got, []string{"A=1"}) {
			t.Errorf("%+v: %q", app, got)
		}
	}
	if got := nodePreloadEnv(app, []string{"A=1"}, filepath.Join(dir, "none.js"), warnf); !slices.Equal(got, []string{"A=1"}) || len(warned) != 1 || !strings.Contains(warned[0], "not there") {
		t.Errorf("missing module: %q, warned %q", got, warned)
	}
}

// TestListenPorts: each fd's TCP port, "-" for a unix socket.
func TestListenPorts(t *testing.T) {
	tcp, addr := tcpListener(t, "http")
	_, port, _ := strings.Cut(addr, ":")
	unixSock := unixListener(t)
	got, err := listenPorts([]uintptr{tcp.Fd(), unixSock.Fd()})
	if err != nil || got != port+" -" {
		t.Errorf("listenPorts = %q %v, want %q", got, err, port+" -")
	}
}

func unixListener(t *testing.T) *os.File {
	t.Helper()
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	f, err := l.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}
