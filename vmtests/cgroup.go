package vmtests

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Why the harness manages cgroups itself: with --keep-unit (needed because
// the host has no systemd to register with) systemd-nspawn puts the
// container's processes below the cgroup of whoever started it. Two
// containers started from the same test process would then share (and
// fight over) one subtree. So every container gets a subtree of its own in
// every hierarchy that nspawn and the container's systemd use (the unified
// cgroup2 one and, on a hybrid host, the named v1 "systemd" one); the
// launching shell moves itself in and execs nspawn. Commands run in the
// container through nsenter enter a sibling leaf ("host-exec") of the same
// subtree, so powering a container off also ends whatever a test left
// running in it. Subtrees are named cohort-vmtest-<test pid>-…, and
// sweepStaleCgroups removes those of test processes that are gone.

const cgroupPrefix = "cohort-vmtest-"

// hierarchy is one mounted cgroup hierarchy and this process's place in it.
type hierarchy struct {
	mount string // where it is mounted
	self  string // this process's cgroup, relative to mount
	v2    bool
}

func (h hierarchy) parent() string { return filepath.Join(h.mount, h.self) }

// hierarchies returns the cgroup2 hierarchy and the named "systemd" v1
// hierarchy, where mounted, with this process's position in each.
func hierarchies() ([]hierarchy, error) {
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, fmt.Errorf("read own cgroups: %w", err)
	}
	var v2Path, sdPath string
	for _, line := range strings.Split(strings.TrimSpace(string(self)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			v2Path = parts[2]
		case slices.Contains(strings.Split(parts[1], ","), "name=systemd"):
			sdPath = parts[2]
		}
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	var hs []hierarchy
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 3 || pf[3] != "/" {
			continue
		}
		mount := pf[4]
		switch {
		case qf[0] == "cgroup2" && v2Path != "" && !seen["v2"]:
			seen["v2"] = true
			hs = append(hs, hierarchy{mount: mount, self: v2Path, v2: true})
		case qf[0] == "cgroup" && sdPath != "" && !seen["sd"] && slices.Contains(strings.Split(qf[2], ","), "name=systemd"):
			seen["sd"] = true
			hs = append(hs, hierarchy{mount: mount, self: sdPath})
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	if len(hs) == 0 {
		return nil, errors.New("no cgroup2 or name=systemd cgroup hierarchy is mounted")
	}
	return hs, nil
}

// cgroupSet is one cgroup, by the same name, in each hierarchy.
type cgroupSet struct {
	dirs []string
	v2   string // the cgroup2 one, or ""
}

// newCgroupSet creates name below this process's cgroup in every
// hierarchy. The caller removes it with remove.
func newCgroupSet(name string) (*cgroupSet, error) {
	hs, err := hierarchies()
	if err != nil {
		return nil, err
	}
	s := &cgroupSet{}
	for _, h := range hs {
		d := filepath.Join(h.parent(), name)
		if err := os.Mkdir(d, 0o755); err != nil {
			_ = s.remove(context.Background())
			return nil, fmt.Errorf("create cgroup: %w", err)
		}
		s.dirs = append(s.dirs, d)
		if h.v2 {
			s.v2 = d
		}
	}
	return s, nil
}

// child creates the cgroup name below s in every hierarchy. It is removed
// with s.
func (s *cgroupSet) child(name string) (*cgroupSet, error) {
	c := &cgroupSet{}
	for _, d := range s.dirs {
		cd := filepath.Join(d, name)
		if err := os.Mkdir(cd, 0o755); err != nil {
			return nil, fmt.Errorf("create cgroup: %w", err)
		}
		c.dirs = append(c.dirs, cd)
		if d == s.v2 {
			c.v2 = cd
		}
	}
	return c, nil
}

// procsFiles returns the cgroup.procs file of s in every hierarchy: a
// process that writes its pid into all of them has moved into s.
func (s *cgroupSet) procsFiles() []string {
	var out []string
	for _, d := range s.dirs {
		out = append(out, filepath.Join(d, "cgroup.procs"))
	}
	return out
}

// pids returns every process in s and its descendants, in any hierarchy.
func (s *cgroupSet) pids() []int {
	set := map[int]bool{}
	for _, d := range s.dirs {
		_ = filepath.WalkDir(d, func(path string, e fs.DirEntry, err error) error {
			if err != nil || !e.IsDir() {
				return nil
			}
			b, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					set[pid] = true
				}
			}
			return nil
		})
	}
	pids := make([]int, 0, len(set))
	for pid := range set {
		pids = append(pids, pid)
	}
	sort.Ints(pids)
	return pids
}

// kill sends SIGKILL to every process in s: through cgroup.kill where the
// kernel has it, and to each pid found in any hierarchy.
func (s *cgroupSet) kill() {
	if s.v2 != "" {
		_ = os.WriteFile(filepath.Join(s.v2, "cgroup.kill"), []byte("1"), 0)
	}
	for _, pid := range s.pids() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// remove kills whatever is still in s, waits (bounded by ctx, and by 15 s
// at most) until it is empty, and removes its directories depth-first.
func (s *cgroupSet) remove(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	var lastErr error
	err := poll(ctx, func() error {
		s.kill()
		if pids := s.pids(); len(pids) > 0 {
			lastErr = fmt.Errorf("cgroup still holds pids %v", pids)
			return lastErr
		}
		for _, d := range s.dirs {
			if err := rmdirTree(d); err != nil {
				lastErr = err
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("remove cgroup %s: %w", strings.Join(s.dirs, ", "), lastErr)
	}
	return nil
}

// rmdirTree removes a cgroup directory and its children, deepest first.
// cgroupfs directories are removed with rmdir, never by deleting files.
func rmdirTree(dir string) error {
	var dirs []string
	err := filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if e.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("walk cgroup: %w", err)
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, syscall.ENOENT) {
			return fmt.Errorf("rmdir %s: %w", dirs[i], err)
		}
	}
	return nil
}

// sweepStaleCgroups removes the container subtrees of test processes that
// no longer run (a test binary killed by -timeout, a crash, ^C), killing
// whatever container was left in them.
func sweepStaleCgroups(logf func(string, ...any)) error {
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	stale := map[string]*cgroupSet{}
	for _, h := range hs {
		entries, err := os.ReadDir(h.parent())
		if err != nil {
			return fmt.Errorf("list cgroups: %w", err)
		}
		for _, e := range entries {
			name := e.Name()
			if !e.IsDir() || !strings.HasPrefix(name, cgroupPrefix) {
				continue
			}
			owner, _, _ := strings.Cut(strings.TrimPrefix(name, cgroupPrefix), "-")
			pid, err := strconv.Atoi(owner)
			if err != nil || pid == os.Getpid() || processAlive(pid) {
				continue
			}
			s := stale[name]
			if s == nil {
				s = &cgroupSet{}
				stale[name] = s
			}
			d := filepath.Join(h.parent(), name)
			s.dirs = append(s.dirs, d)
			if h.v2 {
				s.v2 = d
			}
		}
	}
	var errs []error
	for name, s := range stale {
		logf("removing cgroup %s of a test process that is gone (pids %v)", name, s.pids())
		errs = append(errs, s.remove(context.Background()))
	}
	return errors.Join(errs...)
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
