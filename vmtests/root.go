package vmtests

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Release is a Debian release the scenarios run on.
type Release struct {
	Name    string // the debootstrap suite
	Systemd int    // the major version of the systemd it ships
}

// Releases are the systemd versions cohort supports: the newest stable
// Debian and the oldest systemd cohort's package depends on (>= 252).
var Releases = []Release{
	{Name: "trixie", Systemd: 257},
	{Name: "bookworm", Systemd: 252},
}

// SelectedReleases returns Releases, or the subset named (comma-separated)
// in COHORT_VMTEST_RELEASES.
func SelectedReleases() []Release {
	want := os.Getenv(envReleases)
	if want == "" {
		return Releases
	}
	var out []Release
	for _, r := range Releases {
		if slices.Contains(strings.Split(want, ","), r.Name) {
			out = append(out, r)
		}
	}
	return out
}

// rootPackages are installed into every root on top of debootstrap's
// minbase. Whatever a scenario runs inside, and whatever the cohort .deb
// depends on (systemd >= 252), must be here: the package is installed
// with apt-get --no-download. Changing the list rebuilds the roots.
var rootPackages = []string{
	"systemd", "systemd-sysv", "dbus", // PID 1 and its bus
	"procps", "iproute2", "curl", // kill, ps, ss, a client
	"python3", "nodejs", // workers in other languages
}

// rootFormat is bumped whenever rootStamp's meaning or the build steps
// change, so that old cached roots are rebuilt.
const rootFormat = 1

// stampFile, inside a root, records what the root was built from. A root
// without it (or with another content) is not used.
const stampFile = ".cohort-vmtest-root"

func rootStamp(r Release) string {
	return fmt.Sprintf("format=%d release=%s packages=%s\n", rootFormat, r.Name, strings.Join(rootPackages, ","))
}

// Root returns the cached root directory for r, building it with
// debootstrap when it is missing or stale. Containers boot it with
// --volatile=overlay, so it is never written after it was built. t fails
// when the root cannot be built.
func Root(t testing.TB, r Release) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir, err := ensureRoot(ctx, r, t.Logf)
	if err != nil {
		t.Fatalf("root for %s: %v", r.Name, err)
	}
	return dir
}

// ensureRoot builds the root for r unless a complete one is cached. The
// build goes into a temporary directory that is renamed into place only
// when complete, and a lock file keeps two test processes from building the
// same root at once (the second waits, then uses the first one's).
func ensureRoot(ctx context.Context, r Release, logf func(string, ...any)) (string, error) {
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return "", fmt.Errorf("create cache: %w", err)
	}
	final := filepath.Join(cache, r.Name)
	if rootComplete(final, r) {
		return final, nil
	}
	unlock, err := lockFile(ctx, final+".lock")
	if err != nil {
		return "", err
	}
	defer unlock()
	if rootComplete(final, r) { // built by another process while we waited
		return final, nil
	}
	// Left-overs of builds that were killed; only a lock holder makes them.
	old, _ := filepath.Glob(final + ".tmp-*")
	old2, _ := filepath.Glob(final + ".old-*")
	for _, d := range append(old, old2...) {
		if err := os.RemoveAll(d); err != nil {
			return "", fmt.Errorf("remove stale build: %w", err)
		}
	}

	mirror, err := HostMirror()
	if err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(cache, r.Name+".tmp-")
	if err != nil {
		return "", fmt.Errorf("create build dir: %w", err)
	}
	done := false
	defer func() {
		if !done {
			_ = os.RemoveAll(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", fmt.Errorf("build root: %w", err)
	}
	logf("building %s root with debootstrap from %s (once; cached in %s)", r.Name, mirror, final)
	start := time.Now()
	args := []string{
		"--variant=minbase",
		"--include=" + strings.Join(rootPackages, ","),
		r.Name, tmp, mirror,
	}
	if out, err := hostRun(ctx, "", "debootstrap", args...); err != nil {
		_ = os.WriteFile(final+".debootstrap.log", out, 0o644)
		return "", fmt.Errorf("build %s root (log in %s.debootstrap.log): %w", r.Name, final, err)
	}
	took := time.Since(start)
	if err := finishRoot(ctx, tmp, r); err != nil {
		return "", err
	}
	if _, err := os.Stat(final); err == nil {
		trash := fmt.Sprintf("%s.old-%d", final, os.Getpid())
		if err := os.Rename(final, trash); err != nil {
			return "", fmt.Errorf("replace stale root: %w", err)
		}
		defer os.RemoveAll(trash)
	}
	if err := os.Rename(tmp, final); err != nil {
		return "", fmt.Errorf("install root: %w", err)
	}
	done = true
	logf("built %s root in %v (debootstrap %v)", r.Name, time.Since(start).Round(time.Second), took.Round(time.Second))
	return final, nil
}

// finishRoot makes a freshly bootstrapped root ready: a readable hostname,
// no downloaded .debs, and the stamp last. apt's package lists from
// debootstrap are kept: they let apt-get install a local .deb offline.
func finishRoot(ctx context.Context, dir string, r Release) error {
	if err := os.WriteFile(filepath.Join(dir, "etc/hostname"), []byte("cohort-"+r.Name+"\n"), 0o644); err != nil {
		return fmt.Errorf("finish root: %w", err)
	}
	if _, err := hostRun(ctx, "", "chroot", dir, "apt-get", "clean"); err != nil {
		return fmt.Errorf("finish root: %w", err)
	}
	lists, _ := filepath.Glob(filepath.Join(dir, "var/lib/apt/lists/*_Packages"))
	if len(lists) == 0 {
		return errors.New("finish root: debootstrap left no apt package lists")
	}
	if err := os.WriteFile(filepath.Join(dir, stampFile), []byte(rootStamp(r)), 0o644); err != nil {
		return fmt.Errorf("finish root: %w", err)
	}
	return nil
}

func rootComplete(dir string, r Release) bool {
	b, err := os.ReadFile(filepath.Join(dir, stampFile))
	return err == nil && string(b) == rootStamp(r)
}

// lockFile takes an exclusive flock on path, polling until ctx is done, and
// returns the function that releases it.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	err = poll(ctx, func() error {
		return syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	})
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s (another test process is building this root?): %w", path, err)
	}
	return func() { f.Close() }, nil
}
