package cpuset

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/internal/cgroup"
)

// Limit is how many CPUs this process may use, and what decided it: the
// affinity mask, the cgroup cpuset and the cgroup CPU quota of its cgroup
// and every ancestor, cgroup v2 (cpu.max, cpuset.cpus.effective) and v1
// (cpu.cfs_quota_us / cpu.cfs_period_us, cpuset.effective_cpus) alike, so
// that a container's limits count as much as the service's own.
//
// The cgroup files are parsed here rather than with containerd/cgroups or
// runc's libcontainer: those are large and bring D-Bus and systemd
// clients with them for what is five small files, and uber's automaxprocs
// keeps its reader internal (it only sets GOMAXPROCS).
type Limit struct {
	// Allowed is sched_getaffinity's set (see Allowed): what workers are
	// pinned to.
	Allowed []int
	// Cpuset is the number of CPUs of the tightest cgroup cpuset on the
	// way from this process's cgroup to the root; 0 when none was read.
	// The kernel keeps the affinity mask within it, so it only decides
	// where the mask is wider than the cpuset (a container runtime that
	// changed one and not the other).
	Cpuset int
	// Quota and Period (µs) are the tightest CPU quota on that way:
	// Quota/Period CPUs' worth of time per period. Period is 0 when no
	// cgroup has a quota.
	Quota, Period int64
}

// Count is the number of CPUs the limit allows, at least 1:
// min(affinity, cpuset, ⌊quota/period⌋). The quota is rounded down: it is
// time, not CPUs, and a cgroup that has used it up is throttled until the
// period ends (100 ms by default). Under 1.5 CPUs, two busy workers use
// the cgroup's 150 ms in 75 ms of each period and then both stall for
// 25 ms with requests in hand, a latency spike every period; one worker
// never hits the quota alone and leaves the half CPU to the dispatcher
// and the rest of the service. Rounding up would buy throughput only for
// work that never waits on a request (batch), which is not what workers
// serve. Below one CPU the count is 1: a service needs a worker.
func (l Limit) Count() int {
	n := len(l.Allowed)
	if l.Cpuset > 0 {
		n = min(n, l.Cpuset)
	}
	if l.Period > 0 {
		n = int(min(int64(n), l.Quota/l.Period))
	}
	return max(n, 1)
}

// String says how Count was reached: "affinity 2, cgroup cpu quota 1.50",
// naming a cpuset only when it is narrower than the affinity mask (it
// usually is the mask) and a quota only when there is one.
func (l Limit) String() string {
	s := fmt.Sprintf("affinity %d", len(l.Allowed))
	if l.Cpuset > 0 && l.Cpuset < len(l.Allowed) {
		s += fmt.Sprintf(", cgroup cpuset %d", l.Cpuset)
	}
	if l.Period > 0 {
		s += fmt.Sprintf(", cgroup cpu quota %.2f", float64(l.Quota)/float64(l.Period))
	}
	return s
}

// Read returns the limit of the calling process: Allowed, and its cgroups
// as /proc/self/cgroup and /proc/self/mountinfo place them under /. Only
// the affinity mask can fail it: a cgroup file that is missing, unreadable
// or malformed is no limit (a cgroup that is not mounted cannot be
// enforced on us either, and hostile content must not stop a start).
func Read() (Limit, error) {
	cpus, err := Allowed()
	if err != nil {
		return Limit{}, err
	}
	l := cgroupLimit(os.DirFS("/"))
	l.Allowed = cpus
	return l, nil
}

// Bounds on what is read: every cgroup file is a line, /proc/self/cgroup
// a few dozen; mountinfo can be long in a container, so it is scanned a
// line at a time (cgroup.ScanMounts) up to maxMountinfo bytes; a walk stops after maxDepth
// directories.
const (
	maxSmallFile  = 4 << 10
	maxMountinfo  = 4 << 20
	maxDepth      = 256
	maxCPU        = 1 << 20 // beyond any NR_CPUS
	maxQuotaValue = 1 << 40 // µs; the kernel's own bound is lower
)

// cgroupLimit reads the cgroup part of the limit from fsys, a view of /.
func cgroupLimit(fsys fs.FS) Limit {
	var l Limit
	cg, err := readSmall(fsys, "proc/self/cgroup")
	if err != nil {
		return l
	}
	groups := cgroup.ParseMemberships(cg)
	mounts := readMounts(fsys)
	tighter := func(quota, period int64) {
		// quota/period < l.Quota/l.Period, without overflow: both are
		// below maxQuotaValue.
		if l.Period == 0 || float64(quota)/float64(period) < float64(l.Quota)/float64(l.Period) {
			l.Quota, l.Period = quota, period
		}
	}
	cpuset := func(n int) {
		if n > 0 && (l.Cpuset == 0 || n < l.Cpuset) {
			l.Cpuset = n
		}
	}
	for _, dir := range cgroupDirs(groups, mounts, "") {
		if b, err := readSmall(fsys, path.Join(dir, "cpu.max")); err == nil {
			if q, p, ok := parseCPUMax(b); ok {
				tighter(q, p)
			}
		}
		if b, err := readSmall(fsys, path.Join(dir, "cpuset.cpus.effective")); err == nil {
			cpuset(parseCPUList(b))
		}
	}
	for _, dir := range cgroupDirs(groups, mounts, "cpu") {
		q, err1 := readSmall(fsys, path.Join(dir, "cpu.cfs_quota_us"))
		p, err2 := readSmall(fsys, path.Join(dir, "cpu.cfs_period_us"))
		if err1 == nil && err2 == nil {
			if q, p, ok := parseCFS(q, p); ok {
				tighter(q, p)
			}
		}
	}
	for _, dir := range cgroupDirs(groups, mounts, "cpuset") {
		b, err := readSmall(fsys, path.Join(dir, "cpuset.effective_cpus"))
		if err != nil {
			b, err = readSmall(fsys, path.Join(dir, "cpuset.cpus"))
		}
		if err == nil {
			cpuset(parseCPUList(b))
		}
	}
	return l
}

// readSmall reads name whole, refusing one larger than maxSmallFile and
// anything that is not a regular file or a proc/sysfs pseudo-file.
func readSmall(fsys fs.FS, name string) (string, error) {
	f, err := fsys.Open(name)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || fi.IsDir() || fi.Mode()&(fs.ModeNamedPipe|fs.ModeDevice|fs.ModeSocket) != 0 {
		return "", fmt.Errorf("%s: not a file", name)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxSmallFile+1))
	if err != nil {
		return "", err
	}
	if len(b) > maxSmallFile {
		return "", fmt.Errorf("%s: more than %d bytes", name, maxSmallFile)
	}
	return string(b), nil
}

// readMounts scans /proc/self/mountinfo for cgroup mounts, a line at a
// time and at most maxMountinfo bytes of it.
func readMounts(fsys fs.FS) []cgroup.Mount {
	f, err := fsys.Open("proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	return cgroup.ScanMounts(io.LimitReader(f, maxMountinfo))
}

// cgroupDirs are the directories, relative to /, of this process's cgroup
// in the hierarchy of controller ("" for cgroup v2) and of each ancestor
// up to the mounted root, leaf first. A cgroup path that is not under the
// mount's root (a cgroup namespace that hides it) yields the mount point
// alone; a path with "." or ".." in it yields nothing.
func cgroupDirs(groups []cgroup.Membership, mounts []cgroup.Mount, controller string) []string {
	var p string
	found := false
	for _, g := range groups {
		if (controller == "" && len(g.Controllers) == 0) || (controller != "" && hasString(g.Controllers, controller)) {
			p, found = g.Path, true
			break
		}
	}
	if !found {
		return nil
	}
	for _, m := range mounts {
		if m.V2 != (controller == "") || (controller != "" && !hasString(m.Options, controller)) {
			continue
		}
		top := strings.TrimPrefix(path.Clean(m.Point), "/")
		if top == "" {
			top = "."
		}
		rel, ok := under(p, m.Root)
		if !ok {
			return []string{top}
		}
		dir := path.Join(top, rel)
		if !fs.ValidPath(dir) {
			return nil
		}
		var out []string
		for range maxDepth {
			out = append(out, dir)
			if dir == top {
				break
			}
			dir = path.Dir(dir)
		}
		return out
	}
	return nil
}

// under returns p relative to root when p is root or below it, and p
// holds no "." or ".." components.
func under(p, root string) (string, bool) {
	for _, c := range strings.Split(p, "/") {
		if c == "." || c == ".." {
			return "", false
		}
	}
	root = strings.TrimSuffix(root, "/")
	if p != root && !strings.HasPrefix(p, root+"/") {
		return "", false
	}
	return strings.Trim(p[len(root):], "/"), true
}

func hasString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// parseCPUMax parses cgroup v2's cpu.max: "QUOTA PERIOD" or "max PERIOD"
// (no limit); ok is false for no limit and for anything malformed.
func parseCPUMax(s string) (quota, period int64, ok bool) {
	f := strings.Fields(s)
	if len(f) < 1 || len(f) > 2 || f[0] == "max" {
		return 0, 0, false
	}
	period = 100000 // the kernel's default, for a file that omits it
	if len(f) == 2 {
		if period, ok = parseUsec(f[1]); !ok {
			return 0, 0, false
		}
	}
	if quota, ok = parseUsec(f[0]); !ok {
		return 0, 0, false
	}
	return quota, period, true
}

// parseCFS parses cgroup v1's cpu.cfs_quota_us and cpu.cfs_period_us;
// a quota of -1 is no limit.
func parseCFS(quota, period string) (q, p int64, ok bool) {
	q, ok1 := parseUsec(strings.TrimSpace(quota))
	p, ok2 := parseUsec(strings.TrimSpace(period))
	if !ok1 || !ok2 {
		return 0, 0, false
	}
	return q, p, true
}

// parseUsec parses a positive count of microseconds below maxQuotaValue.
func parseUsec(s string) (int64, bool) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || n >= maxQuotaValue {
		return 0, false
	}
	return n, true
}

// parseCPUList counts the CPUs of a cpuset list ("0-3,8,10-11"), which
// the kernel writes in increasing order without overlaps; anything else
// (and an empty list, which in cgroup v2 means "the parent's") is 0, no
// limit.
func parseCPUList(s string) int {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0
	}
	n, last := 0, -1
	for r := range strings.SplitSeq(s, ",") {
		lo, hi, isRange := strings.Cut(r, "-")
		a, err := strconv.Atoi(lo)
		if err != nil || a < 0 || a >= maxCPU {
			return 0
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a || b >= maxCPU {
				return 0
			}
		}
		if a <= last {
			return 0
		}
		n += b - a + 1
		last = b
	}
	return n
}
