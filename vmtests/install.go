package vmtests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// InstallCohort installs the cohort of this checkout into c, the way a
// user would, and fails t when that does not work.
//
// The method is defaultInstall: "deb" (`make deb`, then `apt-get install`
// inside; the root must hold every dependency) or "bin" (the
// bare binaries, where the package puts them). COHORT_VMTEST_INSTALL=deb
// or =bin overrides it. Either way the
// build happens once per test process and is shared by all containers.
func InstallCohort(t testing.TB, c *Container) {
	t.Helper()
	switch m := installMethod(); m {
	case "deb":
		installDeb(t, c)
	case "bin":
		installBinaries(t, c)
	default:
		t.Fatalf("%s=%q: want deb or bin", envInstall, m)
	}
	t.Logf("%s: installed %s", c.Name, strings.TrimSpace(c.Run(t, "cohort", "version")))
}

// defaultInstall is how InstallCohort installs cohort unless
// COHORT_VMTEST_INSTALL says otherwise: the package, which is what users
// install. ("bin" served until `make deb` built.)
const defaultInstall = "deb"

func installMethod() string {
	if m := os.Getenv(envInstall); m != "" {
		return m
	}
	return defaultInstall
}

// installDeb installs the package from `make deb` with apt, as the README
// tells users to.
func installDeb(t testing.TB, c *Container) {
	t.Helper()
	deb, err := buildDeb()
	if err != nil {
		t.Fatalf("build the .deb: %v", err)
	}
	data, err := os.ReadFile(deb)
	if err != nil {
		t.Fatalf("install the .deb: %v", err)
	}
	inside := c.Share(t, filepath.Base(deb), data)
	// A dry run first: cohort must be the only package apt installs, so
	// that the install needs no download (and a minimal Debian with systemd
	// satisfies Depends). --no-download itself would refuse the local file.
	sim := c.Run(t, "apt-get", "install", "--simulate", "--no-install-recommends", inside)
	for _, line := range strings.Split(sim, "\n") {
		if strings.HasPrefix(line, "Inst ") && !strings.HasPrefix(line, "Inst cohort ") {
			t.Errorf("installing the .deb would pull in another package (add it to rootPackages if that is intended): %s", line)
		}
	}
	c.Run(t, "apt-get", "install", "-y", "--no-install-recommends", inside)
}

// installBinaries puts the binaries where the package would, for use until
// the package builds (or to bisect a packaging problem).
func installBinaries(t testing.TB, c *Container) {
	t.Helper()
	dir, err := buildBinaries()
	if err != nil {
		t.Fatalf("build the binaries: %v", err)
	}
	c.CopyFile(t, filepath.Join(dir, "cohort"), "/usr/bin/cohort", 0o755)
	c.CopyFile(t, filepath.Join(dir, "cohort-generator"), "/usr/lib/systemd/system-generators/cohort-generator", 0o755)
	c.Run(t, "mkdir", "-p", "/etc/cohort")
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	c.CopyFile(t, filepath.Join(root, "packaging", "node-preload.js"), "/usr/share/cohort/node-preload.js", 0o644)
}

var (
	debOnce sync.Once
	debPath string
	debErr  error

	binOnce sync.Once
	binDir  string
	binErr  error
)

// buildDeb runs `make deb` once per process and returns the newest
// dist/cohort_*_amd64.deb.
func buildDeb() (string, error) {
	debOnce.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			debErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		if _, err := hostRun(ctx, root, "make", "deb"); err != nil {
			debErr = err
			return
		}
		debs, _ := filepath.Glob(filepath.Join(root, "dist", "cohort_*_amd64.deb"))
		if len(debs) == 0 {
			debErr = fmt.Errorf("make deb left no dist/cohort_*_amd64.deb")
			return
		}
		sort.Slice(debs, func(i, j int) bool { return modTime(debs[i]).After(modTime(debs[j])) })
		debPath = debs[0]
	})
	return debPath, debErr
}

// buildBinaries builds cmd/cohort and cmd/cohort-generator once per
// process into the cache (not bin/, which people use).
func buildBinaries() (string, error) {
	binOnce.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			binErr = err
			return
		}
		cache, err := CacheDir()
		if err != nil {
			binErr = err
			return
		}
		dir := filepath.Join(cache, "build")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			binErr = fmt.Errorf("create build dir: %w", err)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		if _, err := hostRun(ctx, root, "go", "build", "-trimpath", "-o", dir+"/", "./cmd/cohort", "./cmd/cohort-generator"); err != nil {
			binErr = err
			return
		}
		binDir = dir
	})
	return binDir, binErr
}

func modTime(path string) time.Time {
	fi, err := os.Stat(path)
	if err != nil {
		return time.Time{}
	}
	return fi.ModTime()
}
