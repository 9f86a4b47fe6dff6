package generator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
)

// hostileKinds writes one app file of each hostile kind into dir and
// returns, per file name, what the generator's report must say about it.
// Each is a kind that on 57c59ff stalled the generator, exhausted its
// memory or flooded the log.
func hostileKinds(tb testing.TB, dir string) map[string]string {
	tb.Helper()
	write := func(name, body string) {
		tb.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	listen := func(n int) string {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "[[listen]]\nname = \"l%d\"\naddress = \"127.0.0.1:%d\"\n", i, 20000+i)
		}
		return b.String()
	}
	const cmd = "command = [\"/bin/app\"]\n"
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo.toml"), 0o644); err != nil {
		tb.Fatal(err)
	}
	if err := os.Symlink("/dev/zero", filepath.Join(dir, "zero.toml")); err != nil {
		tb.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "dir.toml"), 0o755); err != nil {
		tb.Fatal(err)
	}
	huge := cmd + strings.Repeat("# padding padding padding padding\n", 2<<20/34)
	write("huge.toml", huge)
	write("inline.toml", "a = "+strings.Repeat("{b=", 32<<10/4)+"1"+strings.Repeat("}", 32<<10/4)+"\n")
	write("arrays.toml", "a = "+strings.Repeat("[", 32<<10)+strings.Repeat("]", 32<<10)+"\n")
	write("dotted.toml", strings.Repeat("a.", 20000)+"a = 1\n")
	write("keys.toml", strings.Repeat("k = 1\n", 100000))
	var unknown strings.Builder
	for i := range 5000 {
		fmt.Fprintf(&unknown, "unknown%d = 1\n", i)
	}
	write("unknown.toml", cmd+unknown.String()+listen(1))
	write("reuseport.toml", cmd+"mode = \"reuseport\"\nworkers = 1024\n"+listen(50))
	write("reuseport2.toml", cmd+"mode = \"reuseport\"\nworkers = 1024\n"+listen(2))
	// Within every per-file limit, but each of the 1024 socket units
	// would repeat 768 KB of [socket] directives.
	var sock strings.Builder
	sock.WriteString("[socket]\n")
	for i := range 250 {
		fmt.Fprintf(&sock, "X%d = \"%s\"\n", i, strings.Repeat("v", 3000))
	}
	write("socketbomb.toml", cmd+"mode = \"reuseport\"\nworkers = 512\n"+listen(2)+sock.String())
	return map[string]string{
		"fifo.toml":       "fifo.toml: not a regular file (a FIFO)",
		"zero.toml":       "zero.toml: not a regular file (a character device)",
		"dir.toml":        "dir.toml: not a regular file (a directory)",
		"huge.toml":       fmt.Sprintf("huge.toml: %d bytes, more than the 1048576 bytes allowed", len(huge)),
		"inline.toml":     "inline.toml:1:53: arrays and inline tables nested more than 16 deep",
		"arrays.toml":     "arrays.toml:1:21: arrays and inline tables nested more than 16 deep",
		"dotted.toml":     "dotted.toml:1:32: dotted key or table name with more than 16 parts",
		"keys.toml":       "keys.toml:10001:3: more than 10000 keys, table headers and array items in one file",
		"unknown.toml":    "unknown.toml: … and 4980 more errors",
		"reuseport.toml":  "reuseport.toml:100:1: listen: more than 32 listeners",
		"reuseport2.toml": "reuseport2.toml:3:1: mode = \"reuseport\" writes one socket unit per worker and listener: 1024 workers × 2 listeners = 2048, more than 1024",
		"socketbomb.toml": "socketbomb.toml: the units would hold more than 8388608 bytes",
	}
}

// goodApps writes n valid app files and returns their names.
func goodApps(tb testing.TB, dir string, n int) []string {
	tb.Helper()
	var names []string
	for i := range n {
		name := fmt.Sprintf("good%03d", i)
		body := fmt.Sprintf("command = [\"/srv/%s/server\"]\nworkers = 4\nenable = true\n[service]\nLimitNOFILE = 65536\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:%d\"\n", name, 10000+i)
		if err := os.WriteFile(filepath.Join(dir, name+".toml"), []byte(body), 0o644); err != nil {
			tb.Fatal(err)
		}
		names = append(names, name)
	}
	return names
}

func buildGenerator(tb testing.TB) generatorBinary {
	tb.Helper()
	dir := tb.TempDir()
	g := generatorBinary{path: filepath.Join(dir, "cohort-generator"), peakrss: filepath.Join(dir, "peakrss")}
	for bin, pkg := range map[string]string{g.path: "../cmd/cohort-generator", g.peakrss: "./testdata/peakrss"} {
		if out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput(); err != nil {
			tb.Fatalf("build %s: %v\n%s", pkg, err, out)
		}
	}
	return g
}

// generatorBinary is the generator built for a test, and the launcher
// that measures its own peak RSS and CPU time (testdata/peakrss says why
// the test's own rusage of a child cannot).
type generatorBinary struct{ path, peakrss string }

// generatorRun is one run of the real cohort-generator binary.
type generatorRun struct {
	elapsed time.Duration
	cpu     time.Duration // user + system, from the generator's rusage
	maxRSS  int64         // bytes, from the generator's rusage
	stderr  string
	err     error
}

// runGenerator runs the generator on search dir etc into out, killing it
// (by its launcher's pid, through exec.CommandContext; the generator dies
// with it) if it outlives the deadline.
func runGenerator(tb testing.TB, g generatorBinary, etc, out string, deadline time.Duration) generatorRun {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	usage := filepath.Join(tb.TempDir(), "usage")
	cmd := exec.CommandContext(ctx, g.peakrss, usage, g.path, out, out, out)
	cmd.Env = append(os.Environ(), "COHORT_SEARCH_PATH="+etc, "COHORT_UNIT_DIRS=", "COHORT_GENERATOR_LOG=stderr")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	r := generatorRun{elapsed: time.Since(start), stderr: stderr.String(), err: err}
	if ctx.Err() != nil {
		tb.Fatalf("cohort-generator still running after %v (killed): %s", deadline, r.stderr)
	}
	b, rerr := os.ReadFile(usage)
	var cpu int64
	if _, serr := fmt.Sscan(string(b), &r.maxRSS, &cpu); rerr != nil || serr != nil {
		tb.Fatalf("the generator's usage (%q): %v %v; stderr: %s", b, rerr, serr, r.stderr)
	}
	r.cpu = time.Duration(cpu)
	return r
}

// TestGeneratorHostileFiles runs the real generator binary, as systemd
// would, over 100 app files of which one of each hostile kind: it must
// finish well under a second with bounded memory, name every refusal with
// its reason, log a bounded number of lines per file, and write the units
// of every good app. On 57c59ff it blocks forever on the FIFO.
func TestGeneratorHostileFiles(t *testing.T) {
	bin := buildGenerator(t)
	etc, out := t.TempDir(), t.TempDir()
	hostile := hostileKinds(t, etc)
	good := goodApps(t, etc, 100-len(hostile))

	r := runGenerator(t, bin, etc, out, 10*time.Second)
	t.Logf("cohort-generator over %d good and %d hostile files: %v (CPU %v), peak RSS %.1f MB",
		len(good), len(hostile), r.elapsed.Round(time.Millisecond), r.cpu.Round(time.Millisecond), float64(r.maxRSS)/(1<<20))
	var exit *exec.ExitError
	if !errors.As(r.err, &exit) || exit.ExitCode() != 1 {
		t.Errorf("exit = %v, want status 1 (files were skipped)", r.err)
	}
	// The CPU time is the figure that does not depend on how busy the
	// machine is (the wall clock of a run on a shared 2-core machine
	// varied from 0.19 s to 3.6 s); runGenerator's 10 s deadline catches
	// a generator that blocks.
	if r.cpu > 500*time.Millisecond {
		t.Errorf("used %v of CPU, want well under a second", r.cpu)
	}
	if r.maxRSS > 32<<20 {
		t.Errorf("peak RSS %d bytes, want at most 32 MB", r.maxRSS)
	}
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	for name, want := range hostile {
		path := filepath.Join(etc, name)
		if !strings.Contains(r.stderr, path+want[len(name):]) {
			t.Errorf("report lacks %q", path+want[len(name):])
		}
		if !strings.Contains(r.stderr, "skipped "+path+": no units generated for it") {
			t.Errorf("report does not say %s was skipped", name)
		}
		n := 0
		for _, l := range lines {
			if strings.HasPrefix(l, path) {
				n++
			}
		}
		if n > appfile.MaxErrors+1 {
			t.Errorf("%d report lines for %s, want at most %d", n, name, appfile.MaxErrors+1)
		}
		if _, err := os.Stat(filepath.Join(out, strings.TrimSuffix(name, ".toml")+".service")); err == nil {
			t.Errorf("units generated for %s", name)
		}
	}
	if len(lines) > 12*(appfile.MaxErrors+2)+1 {
		t.Errorf("%d report lines in all", len(lines))
	}
	for _, name := range good {
		for _, suffix := range []string{".service", ".socket"} {
			if _, err := os.Stat(filepath.Join(out, name+suffix)); err != nil {
				t.Errorf("good app %s: %v", name, err)
			}
		}
	}
}

// BenchmarkGeneratorHostile times whole runs of the generator binary over
// 100 files, one of each hostile kind among them, against the baseline of
// 100 good files in the same run, and reports the peak RSS of each.
func BenchmarkGeneratorHostile(b *testing.B) {
	bin := buildGenerator(b)
	hostileDir, goodDir := b.TempDir(), b.TempDir()
	hostile := hostileKinds(b, hostileDir)
	goodApps(b, hostileDir, 100-len(hostile))
	goodApps(b, goodDir, 100)
	var tHostile, tGood, cpuHostile, cpuGood time.Duration
	var rssHostile, rssGood int64
	for b.Loop() {
		r := runGenerator(b, bin, hostileDir, b.TempDir(), 10*time.Second)
		tHostile += r.elapsed
		cpuHostile += r.cpu
		rssHostile = max(rssHostile, r.maxRSS)
		r = runGenerator(b, bin, goodDir, b.TempDir(), 10*time.Second)
		if r.err != nil {
			b.Fatalf("good files: %v\n%s", r.err, r.stderr)
		}
		tGood += r.elapsed
		cpuGood += r.cpu
		rssGood = max(rssGood, r.maxRSS)
	}
	n := float64(b.N)
	b.ReportMetric(float64(tHostile.Microseconds())/1000/n, "ms/hostile")
	b.ReportMetric(float64(tGood.Microseconds())/1000/n, "ms/good")
	b.ReportMetric(float64(tHostile)/float64(tGood), "x-good")
	b.ReportMetric(float64(cpuHostile.Microseconds())/1000/n, "ms-cpu/hostile")
	b.ReportMetric(float64(cpuGood.Microseconds())/1000/n, "ms-cpu/good")
	b.ReportMetric(float64(cpuHostile)/float64(cpuGood), "x-good-cpu")
	b.ReportMetric(float64(rssHostile)/(1<<20), "MB-peak-hostile")
	b.ReportMetric(float64(rssGood)/(1<<20), "MB-peak-good")
}

// TestSocketsAutoBound: workers = "auto" in reuseport mode is counted
// against MaxReusePortSockets with the CPUs of this host, which the config
// cannot know.
func TestSocketsAutoBound(t *testing.T) {
	app := appfile.New("web")
	app.Path = "/etc/cohort/web.toml"
	app.Mode = appfile.ModeReusePort
	app.Listen = []appfile.Listener{
		{Name: "http", Address: "127.0.0.1:8080", Kind: appfile.ListenTCP},
		{Name: "admin", Address: "127.0.0.1:9000", Kind: appfile.ListenTCP},
	}
	if _, err := Sockets(app, 512); err != nil {
		t.Errorf("512 CPUs × 2 listeners: %v", err)
	}
	_, err := Sockets(app, 513)
	want := `/etc/cohort/web.toml: mode = "reuseport" writes one socket unit per worker and listener: workers = "auto" is 513 CPUs here × 2 listeners = 1026, more than 1024; set workers`
	if err == nil || err.Error() != want {
		t.Errorf("513 CPUs × 2 listeners: %v\nwant %s", err, want)
	}
}
