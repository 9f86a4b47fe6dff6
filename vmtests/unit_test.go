package vmtests

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
)

// These tests check the harness's own logic; they run in every `go test`.

func TestPickMirror(t *testing.T) {
	deb822 := `Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
`
	oneLine := `# deb http://commented.example/debian bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://other.example/debian/ trixie main contrib
deb-src http://src.example/debian trixie main
`
	tests := []struct {
		name    string
		sources []aptSource
		want    string
		ok      bool
	}{
		{"deb822", parseDeb822Sources(deb822), "http://mirror.example/debian", true},
		{"one-line with options", parseOneLineSources(oneLine), "http://other.example/debian", true},
		{"security only", parseDeb822Sources(strings.SplitN(deb822, "\n\n", 2)[1]), "", false},
		{"disabled", parseDeb822Sources("Enabled: no\n" + deb822[:strings.Index(deb822, "\n\n")]), "", false},
		{"none", nil, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := pickMirror(tt.sources)
			if got != tt.want || ok != tt.ok {
				t.Errorf("pickMirror(%+v) = %q, %v; want %q, %v", tt.sources, got, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestLoadCounts(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/fail" {
			http.Error(w, "no", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok"))
	}))
	defer srv.Close()

	res, err := Load(context.Background(), LoadOptions{URL: srv.URL + "/", Requests: 50, Duration: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if res.Sent != 50 || res.OK != 50 || res.Failed() != 0 {
		t.Errorf("against a healthy server: %v; want 50 sent, 50 ok", res)
	}

	res, err = Load(context.Background(), LoadOptions{URL: srv.URL + "/fail", Requests: 20, Duration: 10 * time.Second, KeepAlive: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Non2xx != 20 || res.Status[http.StatusServiceUnavailable] != 20 {
		t.Errorf("against /fail: %v; want 20 non-2xx 503", res)
	}
}

func TestLoadCountsErrors(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now: every request is refused

	res, err := Load(context.Background(), LoadOptions{URL: "http://" + addr + "/", Requests: 10, Duration: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if res.Errors != 10 || len(res.Samples) == 0 {
		t.Errorf("against a closed port: %v; want 10 errors with samples", res)
	}
}

// TestStartLoadCounts: the background load counts like Load, with a live
// 2xx count, and sorts a refused connect as refused.
func TestStartLoadCounts(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok"))
	}))
	defer srv.Close()
	ld := StartLoad(t, LoadOptions{URL: srv.URL + "/", Requests: 30, Duration: 10 * time.Second})
	ld.WaitOK(t, 30, 10*time.Second)
	res, kinds := ld.Stop()
	if res.Sent != 30 || res.OK != 30 || ld.OK() != 30 || kinds != (FailureKinds{}) {
		t.Errorf("against a healthy server: %v, %v, live %d; want 30 sent, 30 ok", res, kinds, ld.OK())
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	ld = StartLoad(t, LoadOptions{URL: "http://" + addr + "/", Requests: 8, Duration: 10 * time.Second})
	<-ld.done // all 8 sent
	res, kinds = ld.Stop()
	if res.Errors != 8 || kinds != (FailureKinds{Refused: 8}) {
		t.Errorf("against a closed port: %v, %v; want 8 refused", res, kinds)
	}
}

func TestLoadIsBoundedByTime(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok"))
	}))
	defer srv.Close()
	start := time.Now()
	res, err := Load(context.Background(), LoadOptions{URL: srv.URL, Requests: 1 << 30, Duration: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Load with Duration 200ms took %v", d)
	}
	if res.OK == 0 || res.Failed() != 0 {
		t.Errorf("time-bounded load: %v; want some ok and none failed", res)
	}
}

func TestLoadRefusesNonLoopback(t *testing.T) {
	for _, u := range []string{"http://192.0.2.1/", "http://example.com/", "https://127.0.0.1/", "http://10.0.0.1:80/"} {
		if _, err := Load(context.Background(), LoadOptions{URL: u, Requests: 1, Duration: time.Second}); err == nil {
			t.Errorf("Load(%q) sent requests; want refused", u)
		}
	}
	for _, u := range []string{"http://127.0.0.1:1/", "http://[::1]:1/", "http://localhost:1/"} {
		if err := checkLoopback(u); err != nil {
			t.Errorf("checkLoopback(%q) = %v; want nil", u, err)
		}
	}
	if _, err := Load(context.Background(), LoadOptions{URL: "http://127.0.0.1:1/"}); err == nil {
		t.Error("Load without bounds ran; want an error")
	}
}

// TestAppFile: the scenarios' app file has workers on line 2 (badedit's
// typo depends on it) and parses as the app it says.
func TestAppFile(t *testing.T) {
	got := appFile(`["/w"]`, 2, lifeSettings, 8080)
	want := `command = ["/w"]
workers = 2
ready = "notify"
ready_timeout = "20s"
stop_timeout = "10s"

[[listen]]
name = "http"
address = "127.0.0.1:8080"
`
	if got != want {
		t.Errorf("appFile:\n%s\nwant:\n%s", got, want)
	}
	app, err := appfile.Parse("web.toml", []byte(got))
	if err != nil || app.Workers.N != 2 || len(app.Listen) != 1 || app.Listen[0].Address != "127.0.0.1:8080" {
		t.Errorf("parse: %+v, %v", app, err)
	}
}

// The QEMU command line keeps the cached image read-only, the guest off
// every network but its forwards, and those forwards on the host's
// 127.0.0.1.
func TestQEMUArgs(t *testing.T) {
	img := vmImage{kernel: "/c/vmlinuz", initrd: "/c/initrd.img", disk: "/c/disk.img"}
	fwd := []string{"hostfwd=tcp:127.0.0.1:4000-10.0.2.15:7000", "hostfwd=tcp:127.0.0.1:4001-10.0.2.15:8001"}
	args := strings.Join(qemuArgs("vm", img, "/share", "/log/console", fwd), " ")
	for _, want := range []string{
		"file=/c/disk.img,if=virtio,format=raw,snapshot=on",
		"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:4000-10.0.2.15:7000,hostfwd=tcp:127.0.0.1:4001-10.0.2.15:8001",
		"path=/share,mount_tag=" + shareTag + ",security_model=none,readonly=on",
		"systemd.unified_cgroup_hierarchy=1",
		"-accel tcg", "-nodefaults", "-no-reboot", "panic=-1",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("qemu args lack %q:\n%s", want, args)
		}
	}
	for _, bad := range []string{"0.0.0.0", "hostfwd=tcp::", "snapshot=off"} {
		if strings.Contains(args, bad) {
			t.Errorf("qemu args contain %q:\n%s", bad, args)
		}
	}
}

// The guest's fstab mounts the share read-only, and the agent unit
// listens where the forwards point and reads the token from the share.
func TestGuestConfig(t *testing.T) {
	dir := t.TempDir()
	if err := configureGuest(dir, Releases[0]); err != nil {
		t.Fatal(err)
	}
	fstab, _ := os.ReadFile(filepath.Join(dir, "etc/fstab"))
	if !strings.Contains(string(fstab), shareTag+" "+ShareDir+" 9p trans=virtio,version=9p2000.L,ro") {
		t.Errorf("fstab: %q", fstab)
	}
	unit, _ := os.ReadFile(filepath.Join(dir, "etc/systemd/system", agentUnit))
	if !strings.Contains(string(unit), fmt.Sprintf("-listen %s:%d -token-file %s/%s", guestIP, guestAgentPort, ShareDir, agentTokenFile)) {
		t.Errorf("agent unit:\n%s", unit)
	}
	if strings.Contains(string(unit), "\nOOMScoreAdjust=") {
		t.Error("agent unit sets OOMScoreAdjust=, which its commands would inherit")
	}
	if target, err := os.Readlink(filepath.Join(dir, "etc/systemd/system/multi-user.target.wants", agentUnit)); err != nil || target != "../"+agentUnit {
		t.Errorf("agent unit not enabled: %q, %v", target, err)
	}
}

// Listen on an nspawn container: one free port on 127.0.0.1, listened on
// and dialled alike.
func TestListenNspawn(t *testing.T) {
	c := &Container{}
	e := c.Listen(t)
	if e.Listen != e.Dial || !strings.HasPrefix(e.Dial, "127.0.0.1:") {
		t.Errorf("Listen = %+v; want one 127.0.0.1 address", e)
	}
	v := &Container{Name: "vm", vm: &vmTransport{forwards: []Endpoint{{Listen: "10.0.2.15:8001", Dial: "127.0.0.1:4001"}}}}
	if e := v.Listen(t); e.Listen != "10.0.2.15:8001" || e.Dial != "127.0.0.1:4001" {
		t.Errorf("VM Listen = %+v", e)
	}
}

// freePorts never hands out one port twice (FreePort one at a time can:
// the kernel may give a just-closed port again, and QEMU then fails to
// set up the forward).
func TestFreePortsDistinct(t *testing.T) {
	ports, err := freePorts(64)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for _, p := range ports {
		if seen[p] || p <= 0 {
			t.Fatalf("port %d twice or invalid in %v", p, ports)
		}
		seen[p] = true
	}
}
