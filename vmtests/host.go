package vmtests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// EnvEnable is the environment variable that turns the end-to-end tests on.
const EnvEnable = "COHORT_VMTEST"

// Other knobs, all optional. README.md lists them.
const (
	envCache    = "COHORT_VMTEST_CACHE"    // where roots and builds are kept
	envMirror   = "COHORT_VMTEST_MIRROR"   // a Debian mirror URL, instead of the host's
	envReleases = "COHORT_VMTEST_RELEASES" // comma-separated subset of Releases
	envInstall  = "COHORT_VMTEST_INSTALL"  // "deb" or "bin"; see InstallCohort
)

// hostTools maps each command the harness runs on the host to the Debian
// package that ships it.
var hostTools = map[string]string{
	"systemd-nspawn": "systemd-container",
	"debootstrap":    "debootstrap",
	"nsenter":        "util-linux",
	"chroot":         "coreutils",
}

var (
	hostOnce sync.Once
	hostErr  error
)

// Require skips t unless COHORT_VMTEST=1: the gate is this package's own,
// and also holds under CI (.ci/run sets CI=1; `make vmtest` sets the gate).
// With it set, a missing piece always fails t, never skips it: it fails
// when the process is not root, and otherwise prepares the host once per
// process: it installs missing host tools with apt-get (failing when one
// is still missing after that) and sweeps away the cgroups of containers
// whose test process died without cleaning up.
func Require(t testing.TB) {
	t.Helper()
	if os.Getenv(EnvEnable) != "1" {
		t.Skipf("end-to-end test under a real systemd: skipped unless %s=1 (run `make vmtest`; needs root, builds Debian roots with debootstrap)", EnvEnable)
	}
	if os.Geteuid() != 0 {
		t.Fatalf("%s=1 needs root (systemd-nspawn, debootstrap, cgroup writes); run `sudo make vmtest`", EnvEnable)
	}
	hostOnce.Do(func() { hostErr = prepareHost(t.Logf) })
	if hostErr != nil {
		t.Fatalf("prepare host: %v", hostErr)
	}
}

func prepareHost(logf func(string, ...any)) error {
	if err := installTools(hostTools, logf); err != nil {
		return err
	}
	if err := sweepStaleCgroups(logf); err != nil {
		return fmt.Errorf("sweep cgroups of dead test runs: %w", err)
	}
	return nil
}

// installTools installs, with apt-get, the package of every command in
// tools (command → Debian package) that is not on PATH, and fails when one
// is still missing after that.
func installTools(tools map[string]string, logf func(string, ...any)) error {
	var missing []string
	for tool, pkg := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, pkg)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	sort.Strings(missing)
	logf("installing host tools: %s", strings.Join(missing, " "))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if _, err := hostRun(ctx, "", "apt-get", "update"); err != nil {
		return fmt.Errorf("install host tools: %w", err)
	}
	args := append([]string{"install", "-y", "--no-install-recommends"}, missing...)
	if _, err := hostRun(ctx, "", "apt-get", args...); err != nil {
		return fmt.Errorf("install host tools: %w", err)
	}
	// A package that installed but did not bring its command (another
	// distribution's names, a diverted binary) would otherwise fail
	// later, in the middle of a container's start.
	for tool, pkg := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("host tool %s still missing after installing %s: %w", tool, pkg, err)
		}
	}
	return nil
}

// hostEnv is the environment of every command the harness runs, on the
// host and in containers: nothing of the caller's leaks in.
func hostEnv() []string {
	return []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LANG=C.UTF-8",
		"TERM=dumb",
		"DEBIAN_FRONTEND=noninteractive",
		"SYSTEMD_PAGER=",
		"SYSTEMD_COLORS=0",
		"SYSTEMD_LESS=",
	}
}

// hostRun runs name on the host with a clean environment (plus Go's, for
// builds) and returns its combined output. The error names the command and
// carries the tail of its output.
func hostRun(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(hostEnv(), goEnv()...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, ctx.Err())
		}
		return out.Bytes(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, tail(out.String(), 40))
	}
	return out.Bytes(), nil
}

// goEnv passes through what the go command needs to find its toolchain,
// caches and module proxy.
func goEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "GO") || k == "HOME" || k == "XDG_CACHE_HOME" {
			env = append(env, kv)
		}
		if k == "PATH" {
			// Keep the caller's PATH after the clean one so that a Go
			// toolchain outside /usr/bin is still found.
			env = append(env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:"+strings.TrimPrefix(kv, "PATH="))
		}
	}
	return env
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

var errNoRepo = errors.New("no go.mod of github.com/cohort-dev/cohort above the working directory")

// RepoRoot returns the root of the cohort checkout the tests run in.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find repo root: %w", err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module github.com/cohort-dev/cohort\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errNoRepo
		}
		dir = parent
	}
}

// CacheDir returns the directory for cached roots and builds:
// $COHORT_VMTEST_CACHE, or .cache/vmtests in the repo (gitignored).
func CacheDir() (string, error) {
	if d := os.Getenv(envCache); d != "" {
		return d, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache", "vmtests"), nil
}
