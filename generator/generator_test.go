package generator

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/units"
)

var update = flag.Bool("update", false, "rewrite the golden unit files in testdata/golden")

// goldenApps parses every testdata/apps/*.toml as if it were in /etc/cohort.
func goldenApps(t testing.TB) map[string]*appfile.App {
	t.Helper()
	paths, err := filepath.Glob("testdata/apps/*.toml")
	if err != nil || len(paths) == 0 {
		t.Fatalf("no test apps: %v", err)
	}
	apps := map[string]*appfile.App{}
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		app, err := appfile.Parse("/etc/cohort/"+filepath.Base(p), data)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		apps[app.Name] = app
	}
	return apps
}

func TestGolden(t *testing.T) {
	for name, app := range goldenApps(t) {
		t.Run(name, func(t *testing.T) {
			us, err := Render(app, Options{CPUs: 3})
			if err != nil {
				t.Fatal(err)
			}
			dir := filepath.Join("testdata", "golden", name)
			if *update {
				if err := os.RemoveAll(dir); err != nil {
					t.Fatal(err)
				}
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := Write(dir, us, nil); err != nil {
					t.Fatal(err)
				}
				// The absolute symlink targets would name this machine's
				// checkout; the golden tree records only the link names.
				if err := os.RemoveAll(filepath.Join(dir, "sockets.target.wants")); err != nil {
					t.Fatal(err)
				}
				if len(us.Wants) > 0 {
					if err := os.WriteFile(filepath.Join(dir, "sockets.target.wants.list"), []byte(strings.Join(us.Wants, "\n")+"\n"), 0o644); err != nil {
						t.Fatal(err)
					}
				}
			}
			entries, err := os.ReadDir(dir)
			if err != nil {
				t.Fatalf("no golden files (run go test -update): %v", err)
			}
			want := map[string]bool{}
			for _, e := range entries {
				want[e.Name()] = true
			}
			for _, f := range us.Files {
				golden, err := os.ReadFile(filepath.Join(dir, f.Name))
				if err != nil {
					t.Errorf("unit %s has no golden file (run go test -update)", f.Name)
					continue
				}
				delete(want, f.Name)
				if !bytes.Equal(golden, f.Content) {
					t.Errorf("%s differs from %s (run go test -update and review the diff):\n%s", f.Name, dir, f.Content)
				}
			}
			wantsList, _ := os.ReadFile(filepath.Join(dir, "sockets.target.wants.list"))
			delete(want, "sockets.target.wants.list")
			if got := strings.Join(us.Wants, "\n"); strings.TrimSpace(string(wantsList)) != got {
				t.Errorf("wants = %q, golden %q", got, wantsList)
			}
			for extra := range want {
				t.Errorf("golden file %s is no longer generated", extra)
			}
		})
	}
}

// TestVerifyGolden runs systemd's own checker on every golden unit. It
// needs systemd-analyze (the systemd package), not a running systemd.
func TestVerifyGolden(t *testing.T) {
	dirs, err := filepath.Glob("testdata/golden/*")
	if err != nil || len(dirs) == 0 {
		t.Fatalf("no golden units: %v", err)
	}
	// verify refuses an ExecStart= binary that does not exist: point the
	// units at one that does.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, golden := range dirs {
		t.Run(filepath.Base(golden), func(t *testing.T) {
			paths, _ := filepath.Glob(filepath.Join(golden, "*.s*"))
			var files []units.File
			for _, u := range paths {
				data, err := os.ReadFile(u)
				if err != nil {
					t.Fatal(err)
				}
				data = bytes.ReplaceAll(data, []byte(DefaultCohortPath+" "), []byte(self+" "))
				files = append(files, units.File{Name: filepath.Base(u), Content: data})
			}
			verifyUnits(t, golden, files)
		})
	}
}

// TestGeneratorBinary runs the real cohort-generator the way systemd does:
// three output directories, a bad app beside good ones.
func TestGeneratorBinary(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "cohort-generator")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/cohort-generator").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	etc, lib, unitDir := t.TempDir(), t.TempDir(), t.TempDir()
	write := func(dir, name, body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	good := "command = [\"/bin/app\"]\nenable = true\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"
	write(etc, "web.toml", good)
	write(etc, "bad.toml", "command = [\"/bin/app\"]\nworkers = 2\nwokers = 4\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8081\"\n")
	write(lib, "api.toml", strings.Replace(good, "8080", "8082", 1))
	write(lib, "web.toml", "this vendor file is overridden by /etc")
	write(etc, "clash.toml", strings.Replace(good, "8080", "8083", 1))
	write(unitDir, "clash.service", "[Service]\nExecStart=/bin/true\n")

	normal, early, late := t.TempDir(), t.TempDir(), t.TempDir()
	cmd := exec.Command(bin, normal, early, late)
	cmd.Env = append(os.Environ(), "COHORT_SEARCH_PATH="+etc+":"+lib, "COHORT_UNIT_DIRS="+unitDir, "COHORT_GENERATOR_LOG=stderr", "COHORT_RUNNING_DIR="+t.TempDir())
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Errorf("exit = %v, want status 1 (a file was skipped)", err)
	}
	for _, want := range []string{
		filepath.Join(etc, "bad.toml") + `:3:1: unknown key "wokers" (did you mean "workers"?)`,
		"clash.toml: unit clash.service already exists as " + filepath.Join(unitDir, "clash.service"),
	} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, &stderr)
		}
	}
	got := listTree(t, normal)
	want := []string{"api.service", "api.socket", "sockets.target.wants/api.socket", "sockets.target.wants/web.socket", "web.service", "web.socket"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("normal dir holds %q, want %q", got, want)
	}
	if len(listTree(t, early))+len(listTree(t, late)) > 0 {
		t.Error("wrote into the early or late directory")
	}
	svc, err := os.ReadFile(filepath.Join(normal, "web.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{"SourcePath=" + filepath.Join(etc, "web.toml"), "ExecStart=/usr/bin/cohort dispatch " + filepath.Join(etc, "web.toml")} {
		if !strings.Contains(string(svc), line+"\n") {
			t.Errorf("web.service lacks %q:\n%s", line, svc)
		}
	}
	if target, err := os.Readlink(filepath.Join(normal, "sockets.target.wants", "web.socket")); err != nil || target != filepath.Join(normal, "web.socket") {
		t.Errorf("wants link = %q, %v", target, err)
	}

	// With only good files the generator succeeds.
	if err := os.Remove(filepath.Join(etc, "bad.toml")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(etc, "clash.toml")); err != nil {
		t.Fatal(err)
	}
	cmd = exec.Command(bin, t.TempDir(), early, late)
	cmd.Env = append(os.Environ(), "COHORT_SEARCH_PATH="+etc+":"+lib, "COHORT_UNIT_DIRS="+unitDir, "COHORT_GENERATOR_LOG=stderr", "COHORT_RUNNING_DIR="+t.TempDir())
	if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
		t.Errorf("good files only: %v\n%s", err, out)
	}
}

func listTree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if p != dir && !info.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

func TestDuplicateUnitNamesAcrossApps(t *testing.T) {
	etc := t.TempDir()
	// App "web" with listener "admin" makes web-admin.socket; so would the
	// main socket of an app named "web-admin".
	if err := os.WriteFile(filepath.Join(etc, "web.toml"), []byte("command = [\"/bin/a\"]\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:1\"\n[[listen]]\nname = \"admin\"\naddress = \"127.0.0.1:2\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(etc, "web-admin.toml"), []byte("command = [\"/bin/a\"]\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:3\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	g := &Generator{SearchPath: []string{etc}, Log: &log}
	err := g.Run(t.TempDir())
	if !errors.Is(err, ErrBadApps) || !strings.Contains(log.String(), "unit web-admin.socket is already generated for") {
		t.Errorf("err = %v, log:\n%s", err, &log)
	}
}

// BenchmarkGenerate100 measures a whole generator run over 100 app files,
// the figure that matters at boot (target: well under 50 ms). Each
// iteration also times merely reading the same files, the baseline that
// the ratio is taken against. Like systemd's /run/systemd/generator, the
// output goes to a tmpfs (/dev/shm) when there is one: on a disk the figure
// would be the disk's.
func BenchmarkGenerate100(b *testing.B) {
	etc := b.TempDir()
	outRoot := ""
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		outRoot = "/dev/shm"
	}
	for i := range 100 {
		body := fmt.Sprintf("command = [\"/srv/app%d/server\"]\nworkers = 4\nenable = true\n[service]\nLimitNOFILE = 65536\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:%d\"\n[[listen]]\nname = \"admin\"\naddress = \"/run/app%d.sock\"\n", i, 10000+i, i)
		if err := os.WriteFile(filepath.Join(etc, fmt.Sprintf("app%03d.toml", i)), []byte(body), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	var read, generate time.Duration
	for b.Loop() {
		b.StopTimer()
		out, err := os.MkdirTemp(outRoot, "cohort-bench-")
		if err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		files, _ := appfile.Discover([]string{etc})
		for _, f := range files {
			if _, err := os.ReadFile(f); err != nil {
				b.Fatal(err)
			}
		}
		t1 := time.Now()
		b.StartTimer()
		g := &Generator{SearchPath: []string{etc}, Options: Options{UnitDirs: UnitDirs()}, Log: os.Stderr}
		if err := g.Run(out); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		read += t1.Sub(t0)
		generate += time.Since(t1)
		if err := os.RemoveAll(out); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	n := float64(b.N)
	b.ReportMetric(float64(generate.Microseconds())/1000/n, "ms/100apps")
	b.ReportMetric(float64(read.Microseconds())/1000/n, "ms/read-only")
	b.ReportMetric(float64(generate)/float64(read), "x-read-only")
}

// TestSocketsReusePort: reuseport mode names one socket per listener and
// worker slot, each with a FileDescriptorName= the dispatcher parses back
// to its listener and slot; "auto" counts the CPUs given, or this
// process's own.
func TestSocketsReusePort(t *testing.T) {
	app := appfile.New("web")
	app.Mode = appfile.ModeReusePort
	app.Listen = []appfile.Listener{
		{Name: "http", Address: "127.0.0.1:8080", Kind: appfile.ListenTCP},
		{Name: "v1.admin", Address: "127.0.0.1:9000", Kind: appfile.ListenTCP},
	}
	for _, tc := range []struct {
		workers appfile.Workers
		cpus    int
		want    []string
	}{
		{appfile.Workers{N: 1}, 8, []string{"web.socket=http.0", "web-v1.admin-0.socket=v1.admin.0"}},
		{appfile.Workers{N: 2}, 8, []string{"web.socket=http.0", "web-http-1.socket=http.1", "web-v1.admin-0.socket=v1.admin.0", "web-v1.admin-1.socket=v1.admin.1"}},
		{appfile.Workers{Auto: true}, 2, []string{"web.socket=http.0", "web-http-1.socket=http.1", "web-v1.admin-0.socket=v1.admin.0", "web-v1.admin-1.socket=v1.admin.1"}},
	} {
		app.Workers = tc.workers
		socks, err := Sockets(app, tc.cpus)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, s := range socks {
			got = append(got, s.Unit+"="+s.FDName)
			l, slot, ok := appfile.ParseSlotFDName(s.FDName)
			if !ok || l != s.Listener.Name || slot != s.Slot {
				t.Errorf("ParseSlotFDName(%q) = %q, %d, %v; want %q, %d", s.FDName, l, slot, ok, s.Listener.Name, s.Slot)
			}
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("workers %+v, %d CPUs: sockets %q; want %q", tc.workers, tc.cpus, got, tc.want)
		}
	}

	app.Workers = appfile.Workers{Auto: true}
	n, err := AvailableCPUs()
	if err != nil {
		t.Fatal(err)
	}
	socks, err := Sockets(app, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 2*n {
		t.Errorf("workers = auto on %d CPUs: %d sockets; want %d", n, len(socks), 2*n)
	}
}

// TestJournalRateLimit: journald's per-unit limit holds two windows of
// every slot's budget and the dispatcher's own lines; no limit in the
// app file is none in journald either; "auto" counts the CPUs.
func TestJournalRateLimit(t *testing.T) {
	for _, tt := range []struct {
		lim     appfile.LogRateLimit
		workers int
		want    units.LogRateLimit
	}{
		{appfile.LogRateLimit{Interval: 10 * time.Second, Burst: 5000}, 2, units.LogRateLimit{Interval: 10 * time.Second, Burst: 21200}},
		{appfile.LogRateLimit{Interval: 30 * time.Second, Burst: 10000}, 1, units.LogRateLimit{Interval: 30 * time.Second, Burst: 21100}},
		{appfile.LogRateLimit{Interval: time.Second, Burst: appfile.MaxLogRateLimitBurst}, appfile.MaxWorkers, units.LogRateLimit{Interval: time.Second, Burst: 2048103400}},
		{appfile.LogRateLimit{Interval: 0, Burst: 10}, 4, units.LogRateLimit{}},
		{appfile.LogRateLimit{Interval: time.Second, Burst: 0}, 4, units.LogRateLimit{}},
	} {
		if got := JournalRateLimit(tt.lim, tt.workers); *got != tt.want {
			t.Errorf("JournalRateLimit(%+v, %d) = %+v, want %+v", tt.lim, tt.workers, *got, tt.want)
		}
	}
	app, err := appfile.Parse("/etc/cohort/web.toml", []byte("command = [\"/bin/app\"]\nworkers = \"auto\"\nlog_rate_limit_burst = 100\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	us, err := Render(app, Options{CPUs: 8})
	if err != nil {
		t.Fatal(err)
	}
	svc := string(us.Files[len(us.Files)-1].Content)
	if !strings.Contains(svc, "\nLogRateLimitBurst=3400\n") || !strings.Contains(svc, "\nLogRateLimitIntervalSec=30s\n") {
		t.Errorf("8 CPUs, 100 lines per worker: want LogRateLimitBurst=3400 (2×8×100 + 1000 + 8×100):\n%s", svc)
	}
}

// TestJournalRateLimitUserWins: a file that sets journald's limit or the
// identifier itself (the workaround users had before cohort sized them)
// still generates, with its own values and none of cohort's beside them.
func TestJournalRateLimitUserWins(t *testing.T) {
	app, err := appfile.Parse("/etc/cohort/web.toml", []byte("command = [\"/bin/app\"]\nworkers = 2\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n[service]\nLogRateLimitIntervalSec = 0\nSyslogIdentifier = \"mine\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	us, err := Render(app, Options{CPUs: 8})
	if err != nil {
		t.Fatal(err)
	}
	svc := string(us.Files[len(us.Files)-1].Content)
	for _, want := range []string{"\nLogRateLimitIntervalSec=0\n", "\nSyslogIdentifier=mine\n"} {
		if strings.Count(svc, want) != 1 {
			t.Errorf("want %q once:\n%s", want, svc)
		}
	}
	for _, unwanted := range []string{"LogRateLimitBurst=", "LogRateLimitIntervalSec=30s", "SyslogIdentifier=web"} {
		if strings.Contains(svc, unwanted) {
			t.Errorf("cohort's %q beside the file's own:\n%s", unwanted, svc)
		}
	}
}

// TestDelegateSubgroup: the service always delegates (a cgroup per
// worker), with a writable cgroupfs; DelegateSubgroup= only for a systemd
// that has it (254), so that 252's verify stays silent.
func TestDelegateSubgroup(t *testing.T) {
	app, err := appfile.Parse("/etc/cohort/web.toml", []byte("command = [\"/bin/app\"]\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		version int
		want    bool
	}{{0, false}, {252, false}, {253, false}, {254, true}, {257, true}} {
		us, err := Render(app, Options{SystemdVersion: c.version, CPUs: 2})
		if err != nil {
			t.Fatal(err)
		}
		svc := string(us.Files[len(us.Files)-1].Content)
		if !strings.Contains(svc, "\nDelegate=yes\n") || !strings.Contains(svc, "\nProtectControlGroups=no\n") || strings.Contains(svc, "ProtectControlGroups=yes") {
			t.Errorf("systemd %d: no Delegate=yes with ProtectControlGroups=no:\n%s", c.version, svc)
		}
		if got := strings.Contains(svc, "\nDelegateSubgroup=supervisor\n"); got != c.want {
			t.Errorf("systemd %d: DelegateSubgroup=supervisor %v, want %v", c.version, got, c.want)
		}
	}
}

func TestParseSystemdVersion(t *testing.T) {
	if v, err := ParseSystemdVersion("systemd 257 (257.13-1~deb13u1)\n+PAM +AUDIT\n"); err != nil || v != 257 {
		t.Errorf("got %d, %v", v, err)
	}
	for _, bad := range []string{"", "systemd\n", "udev 252\n", "systemd x\n", "systemd -1\n"} {
		if v, err := ParseSystemdVersion(bad); err == nil {
			t.Errorf("ParseSystemdVersion(%q) = %d", bad, v)
		}
	}
}
