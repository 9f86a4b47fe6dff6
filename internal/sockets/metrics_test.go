package sockets

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/cohort-dev/cohort/appfile"
)

// TestTakeMetrics: the fd named cohort-metrics is taken out of what
// systemd passed, the others keep their order for Match.
func TestTakeMetrics(t *testing.T) {
	a, m, b := os.NewFile(0, "http"), os.NewFile(0, appfile.MetricsFDName), os.NewFile(0, "admin")
	got, rest := TakeMetrics([]*os.File{a, m, b})
	if got != m || len(rest) != 2 || rest[0] != a || rest[1] != b {
		t.Errorf("TakeMetrics: %v, %v", got, rest)
	}
	if got, rest := TakeMetrics([]*os.File{a}); got != nil || len(rest) != 1 {
		t.Errorf("without one: %v, %v", got, rest)
	}
}

// TestBindMetrics binds a unix metrics listener that answers, and removes
// its file at cleanup; an app without [metrics] binds nothing.
func TestBindMetrics(t *testing.T) {
	app := appfile.New("web")
	if f, cleanup, err := BindMetrics(app); f != nil || err != nil {
		t.Fatalf("no [metrics]: %v %v", f, err)
	} else {
		cleanup()
	}
	path := filepath.Join(t.TempDir(), "m.sock")
	app.Metrics.Listen = appfile.Listener{Name: appfile.MetricsFDName, Address: path, Kind: appfile.ListenUnix}
	f, cleanup, err := BindMetrics(app)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("dial the metrics socket: %v", err)
	}
	c.Close()
	f.Close()
	cleanup()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("socket file left: %v", err)
	}
}
