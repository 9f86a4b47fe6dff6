package testcgroup

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testtool"
)

// V2 makes a fresh cgroup in this process's cgroup2 hierarchy (mounted at
// /sys/fs/cgroup on a cgroup2 host, /sys/fs/cgroup/unified on a hybrid
// one) and returns its directory; at cleanup everything still in it or
// below is killed (cgroup.kill) and the whole subtree removed, deepest
// first. It ends t with testtool.Missing when the test is not root, there
// is no cgroup2 hierarchy, or it lacks cgroup.kill (Linux < 5.14).
func V2(t testing.TB) string {
	t.Helper()
	if os.Geteuid() != 0 {
		testtool.Missing(t, "creating cgroups needs root")
	}
	mount, root := v2Mount(t)
	if mount == "" {
		testtool.Missing(t, "no cgroup2 hierarchy is mounted")
	}
	cg, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	var self string
	for line := range strings.Lines(string(cg)) {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			rel, ok := strings.CutPrefix(p, strings.TrimSuffix(root, "/"))
			if !ok {
				t.Fatalf("cgroup2 path %s is not under the mount's root %s", p, root)
			}
			self = filepath.Join(mount, rel)
		}
	}
	if self == "" {
		t.Fatalf("/proc/self/cgroup has no cgroup2 line:\n%s", cg)
	}
	dir := filepath.Join(self, fmt.Sprintf("cohort-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "cgroup.kill")); err != nil {
		os.Remove(dir)
		testtool.Missing(t, "cgroup2 has no cgroup.kill (Linux < 5.14): %v", err)
	}
	t.Cleanup(func() {
		deadline := time.Now().Add(15 * time.Second)
		for {
			_ = os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0o644)
			err := removeTree(dir)
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("cgroup %s not removed: %v", dir, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	return dir
}

// removeTree removes the cgroup dir and every cgroup below it, deepest
// first; a cgroup that is gone already is fine.
func removeTree(dir string) error {
	entries, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	if err := os.Remove(dir); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// v2Mount is where the cgroup2 hierarchy is mounted and its root there;
// "" when it is not.
func v2Mount(t testing.TB) (mount, root string) {
	t.Helper()
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(mi)) {
		pre, post, ok := strings.Cut(strings.TrimSpace(line), " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 1 && g[0] == "cgroup2" {
			return f[4], f[3]
		}
	}
	return "", ""
}
