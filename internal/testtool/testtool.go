// Package testtool is how cohort's tests ask for a program of the host
// (python3, node, systemd-analyze, gunicorn, …): one place that decides
// what a missing tool means. On a developer's machine the test is skipped
// and says what to install; when the environment variable CI is set (.ci/run
// sets it, and .ci/deps installs every tool) the test fails instead, so
// that a CI run can never pass by skipping.
package testtool

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// EnvCI is the environment variable that turns a missing tool from a skip
// into a failure. Any non-empty value counts, as with most CI services.
const EnvCI = "CI"

// Missing ends t because something it needs is not there: it calls
// t.Fatalf when CI is set and t.Skipf otherwise. The message says what is
// missing; Missing adds what happens where.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv(EnvCI) != "" {
		t.Fatalf("%s (%s is set, so this fails; .ci/deps installs it)", msg, EnvCI)
	}
	t.Skipf("%s (skipped; with %s set this fails)", msg, EnvCI)
}

// Need returns the path of the program name, looked up on PATH, or ends t
// with Missing.
func Need(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, "%s is not installed: %v", name, err)
	}
	return p
}

// System returns Debian's /usr/bin/name when there is one, else name on
// PATH (as Need would). A shim earlier on PATH (pyenv's python3, nvm's
// node) can take seconds to start on a loaded machine, which makes tests
// that time a worker's start flaky; Debian's is also the one whose modules
// .ci/deps installs (python3-gunicorn).
func System(t testing.TB, name string) string {
	t.Helper()
	p := "/usr/bin/" + name
	if _, err := os.Stat(p); err == nil {
		return p
	}
	return Need(t, name)
}

// Python is System(t, "python3").
func Python(t testing.TB) string {
	t.Helper()
	return System(t, "python3")
}

// NeedPython returns a python3 (as Python) that can import module, or ends
// t with Missing.
func NeedPython(t testing.TB, module string) string {
	t.Helper()
	py := Python(t)
	if out, err := exec.Command(py, "-c", "import "+module).CombinedOutput(); err != nil {
		Missing(t, "%s cannot import %s (Debian: python3-%s): %v %s", py, module, module, err, out)
	}
	return py
}
