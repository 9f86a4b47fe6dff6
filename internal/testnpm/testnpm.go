// Package testnpm gives tests Node packages from npm (Express, Fastify)
// without vendoring them into the repository: Modules installs them with
// the real npm, once, into a cache directory shared by test runs, and
// returns the node_modules directory to put on NODE_PATH or copy into a
// container. A missing npm, or an install that fails, ends the test
// through testtool.Missing: a skip on a laptop, a failure under CI.
package testnpm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cohort-dev/cohort/internal/testtool"
)

// Pinned versions: the tests' Express and Fastify. Fastify 4 and Express
// 4 support Node 18 (bookworm's nodejs) as well as 20 and 22; neither has
// install scripts or native parts, so node_modules can be copied into a
// container of another Debian release.
const (
	Express = "express@4.21.2"
	Fastify = "fastify@4.29.1"
)

// EnvCache overrides where the packages are cached (default:
// $XDG_CACHE_HOME/cohort-tests/npm, or ~/.cache/…).
const EnvCache = "COHORT_NPM_CACHE"

// installTimeout bounds one npm install.
const installTimeout = 5 * time.Minute

// Modules returns a node_modules directory holding pkgs (name@version),
// installing them on first use. Concurrent test processes wait for each
// other on a lock file; an interrupted install is never used (it is
// renamed into place only when complete).
func Modules(t testing.TB, pkgs ...string) string {
	t.Helper()
	npm := testtool.Need(t, "npm")
	cache := os.Getenv(EnvCache)
	if cache == "" {
		dir, err := os.UserCacheDir()
		if err != nil {
			testtool.Missing(t, "no cache directory for npm packages: %v (set %s)", err, EnvCache)
		}
		cache = filepath.Join(dir, "cohort-tests", "npm")
	}
	sum := sha256.Sum256([]byte(strings.Join(pkgs, "\n")))
	final := filepath.Join(cache, hex.EncodeToString(sum[:8]))
	modules := filepath.Join(final, "node_modules")
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Fatalf("npm cache: %v", err)
	}
	lock, err := os.OpenFile(final+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatalf("npm cache lock: %v", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatalf("npm cache lock: %v", err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	if _, err := os.Stat(filepath.Join(final, "done")); err == nil {
		return modules
	}
	tmp, err := os.MkdirTemp(cache, ".install-")
	if err != nil {
		t.Fatalf("npm cache: %v", err)
	}
	defer os.RemoveAll(tmp)
	if err := os.WriteFile(filepath.Join(tmp, "package.json"), []byte(`{"private": true}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), installTimeout)
	defer cancel()
	args := append([]string{"install", "--no-audit", "--no-fund", "--ignore-scripts", "--no-save", "--loglevel=error"}, pkgs...)
	cmd := exec.CommandContext(ctx, npm, args...)
	cmd.Dir = tmp
	if out, err := cmd.CombinedOutput(); err != nil {
		testtool.Missing(t, "npm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	for _, p := range pkgs {
		name := p[:strings.LastIndexByte(p, '@')]
		if _, err := os.Stat(filepath.Join(tmp, "node_modules", name, "package.json")); err != nil {
			t.Fatalf("npm installed no %s: %v", name, err)
		}
	}
	if err := os.WriteFile(filepath.Join(tmp, "done"), []byte(strings.Join(pkgs, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(final) // a partial one from an older format
	if err := os.Rename(tmp, final); err != nil {
		t.Fatalf("npm cache: %v", err)
	}
	return modules
}
