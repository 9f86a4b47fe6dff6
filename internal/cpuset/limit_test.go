package cpuset

import (
	"strings"
	"testing"
	"testing/fstest"

	"github.com/cohort-dev/cohort/internal/cgroup"
)

func TestParseCPUMax(t *testing.T) {
	for _, c := range []struct {
		in            string
		quota, period int64
		ok            bool
	}{
		{"max 100000\n", 0, 0, false},
		{"max", 0, 0, false},
		{"150000 100000\n", 150000, 100000, true},
		{"50000 100000", 50000, 100000, true},
		{"200000", 200000, 100000, true}, // period omitted: the default
		{"  300000   100000  ", 300000, 100000, true},
		{"", 0, 0, false},
		{"0 100000", 0, 0, false},
		{"-1 100000", 0, 0, false},
		{"150000 0", 0, 0, false},
		{"150000 100000 7", 0, 0, false},
		{"1.5 100000", 0, 0, false},
		{"99999999999999999999 100000", 0, 0, false},
		{"150000 max", 0, 0, false},
	} {
		q, p, ok := parseCPUMax(c.in)
		if q != c.quota || p != c.period || ok != c.ok {
			t.Errorf("parseCPUMax(%q) = %d, %d, %v; want %d, %d, %v", c.in, q, p, ok, c.quota, c.period, c.ok)
		}
	}
}

func TestParseCFS(t *testing.T) {
	for _, c := range []struct {
		quota, period string
		q, p          int64
		ok            bool
	}{
		{"-1\n", "100000\n", 0, 0, false},
		{"150000\n", "100000\n", 150000, 100000, true},
		{"150000", "0", 0, 0, false},
		{"x", "100000", 0, 0, false},
	} {
		q, p, ok := parseCFS(c.quota, c.period)
		if q != c.q || p != c.p || ok != c.ok {
			t.Errorf("parseCFS(%q, %q) = %d, %d, %v", c.quota, c.period, q, p, ok)
		}
	}
}

func TestParseCPUList(t *testing.T) {
	for in, want := range map[string]int{
		"0-1\n":         2,
		"0":             1,
		"0-3,8,10-11\n": 7,
		"":              0,
		"\n":            0,
		"3-1":           0, // backwards
		"0-3,2":         0, // overlap
		"1,0":           0, // out of order
		"0-99999999":    0, // beyond any CPU
		"a":             0,
		"0,,1":          0,
		"-1":            0,
	} {
		if got := parseCPUList(in); got != want {
			t.Errorf("parseCPUList(%q) = %d, want %d", in, got, want)
		}
	}
}

func TestLimitCount(t *testing.T) {
	two := []int{0, 1}
	for _, c := range []struct {
		l    Limit
		n    int
		text string
	}{
		{Limit{Allowed: two}, 2, "affinity 2"},
		{Limit{Allowed: two, Quota: 150000, Period: 100000}, 1, "affinity 2, cgroup cpu quota 1.50"},
		{Limit{Allowed: two, Quota: 50000, Period: 100000}, 1, "affinity 2, cgroup cpu quota 0.50"},
		{Limit{Allowed: two, Quota: 400000, Period: 100000}, 2, "affinity 2, cgroup cpu quota 4.00"},
		{Limit{Allowed: []int{0, 1, 2, 3}, Cpuset: 3}, 3, "affinity 4, cgroup cpuset 3"},
		{Limit{Allowed: two, Cpuset: 2}, 2, "affinity 2"},
	} {
		if n, s := c.l.Count(), c.l.String(); n != c.n || s != c.text {
			t.Errorf("%+v: Count %d, String %q; want %d, %q", c.l, n, s, c.n, c.text)
		}
	}
}

// hybrid is this kind of machine: cgroup v1 controllers, an empty
// unified hierarchy.
const hybridMounts = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`

func file(s string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(s)} }

// TestCgroupLimitV1: the tightest quota on the way to the root counts,
// whether on the leaf or an ancestor; -1 is none; the cpuset is the
// leaf's effective one.
func TestCgroupLimitV1(t *testing.T) {
	fsys := fstest.MapFS{
		"proc/self/cgroup":                                file("4:cpuset:/a/b\n3:cpu,cpuacct:/a/b\n0::/a/b\n"),
		"proc/self/mountinfo":                             file(hybridMounts),
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":      file("-1\n"),
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us":     file("100000\n"),
		"sys/fs/cgroup/cpu,cpuacct/a/cpu.cfs_quota_us":    file("250000\n"),
		"sys/fs/cgroup/cpu,cpuacct/a/cpu.cfs_period_us":   file("100000\n"),
		"sys/fs/cgroup/cpu,cpuacct/a/b/cpu.cfs_quota_us":  file("-1\n"),
		"sys/fs/cgroup/cpu,cpuacct/a/b/cpu.cfs_period_us": file("100000\n"),
		"sys/fs/cgroup/cpuset/a/b/cpuset.effective_cpus":  file("0-2\n"),
	}
	l := cgroupLimit(fsys)
	if l.Quota != 250000 || l.Period != 100000 || l.Cpuset != 3 {
		t.Errorf("limit %+v, want quota 250000/100000, cpuset 3", l)
	}
	fsys["sys/fs/cgroup/cpu,cpuacct/a/b/cpu.cfs_quota_us"] = file("150000\n")
	if l := cgroupLimit(fsys); l.Quota != 150000 {
		t.Errorf("leaf quota 1.5 under 2.5: %+v", l)
	}
}

// TestCgroupLimitV2: cpu.max of the leaf and each ancestor; a container
// whose cgroup namespace shows "/" reads its mount's root.
func TestCgroupLimitV2(t *testing.T) {
	mounts := "25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
	fsys := fstest.MapFS{
		"proc/self/cgroup":                                             file("0::/system.slice/web.service\n"),
		"proc/self/mountinfo":                                          file(mounts),
		"sys/fs/cgroup/cpu.max":                                        file("max 100000\n"),
		"sys/fs/cgroup/system.slice/cpu.max":                           file("300000 100000\n"),
		"sys/fs/cgroup/system.slice/web.service/cpu.max":               file("max 100000\n"),
		"sys/fs/cgroup/system.slice/web.service/cpuset.cpus.effective": file("0-3\n"),
	}
	if l := cgroupLimit(fsys); l.Quota != 300000 || l.Period != 100000 || l.Cpuset != 4 {
		t.Errorf("limit %+v", l)
	}
	ns := fstest.MapFS{
		"proc/self/cgroup":      file("0::/\n"),
		"proc/self/mountinfo":   file(mounts),
		"sys/fs/cgroup/cpu.max": file("150000 100000\n"),
	}
	if l := cgroupLimit(ns); l.Quota != 150000 {
		t.Errorf("namespaced: %+v", l)
	}
	// A v1 bind mount of a sub-hierarchy (docker without cgroupns):
	// the path is relative to the mount's root.
	docker := fstest.MapFS{
		"proc/self/cgroup":                            file("3:cpu,cpuacct:/docker/abc\n"),
		"proc/self/mountinfo":                         file("32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n"),
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":  file("150000"),
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": file("100000"),
	}
	if l := cgroupLimit(docker); l.Quota != 150000 {
		t.Errorf("docker v1: %+v", l)
	}
}

// TestCgroupLimitHostile: missing, oversized, malformed and escaping
// content is no limit, never an error or a walk outside the mount.
func TestCgroupLimitHostile(t *testing.T) {
	mounts := "25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
	for name, fsys := range map[string]fstest.MapFS{
		"nothing":  {},
		"no mount": {"proc/self/cgroup": file("0::/a\n")},
		"dotdot": {
			"proc/self/cgroup":    file("0::/../../etc\n"),
			"proc/self/mountinfo": file(mounts),
			"etc/cpu.max":         file("100000 100000"),
		},
		"huge cpu.max": {
			"proc/self/cgroup":      file("0::/\n"),
			"proc/self/mountinfo":   file(mounts),
			"sys/fs/cgroup/cpu.max": file("150000 100000" + strings.Repeat(" ", maxSmallFile)),
		},
		"garbage": {
			"proc/self/cgroup":      file("\x00:::\n::\n0::relative\n"),
			"proc/self/mountinfo":   file("- - -\n1 2 3 \\9 /x - cgroup2 x rw\n" + strings.Repeat("x", cgroup.MaxMountLine+1) + "\n"),
			"sys/fs/cgroup/cpu.max": file("150000 100000"),
		},
		"bad escape": {
			"proc/self/cgroup":      file("0::/\n"),
			"proc/self/mountinfo":   file(`25 1 0:22 / /sys/fs/cgroup\04 rw - cgroup2 cgroup2 rw` + "\n"),
			"sys/fs/cgroup/cpu.max": file("150000 100000"),
		},
	} {
		if l := cgroupLimit(fsys); l.Period != 0 || l.Cpuset != 0 {
			t.Errorf("%s: limit %+v, want none", name, l)
		}
	}
	// An escaped mount point is unescaped.
	esc := fstest.MapFS{
		"proc/self/cgroup":     file("0::/\n"),
		"proc/self/mountinfo":  file(`25 1 0:22 / /sys/fs/my\040cg rw - cgroup2 cgroup2 rw` + "\n"),
		"sys/fs/my cg/cpu.max": file("150000 100000"),
	}
	if l := cgroupLimit(esc); l.Quota != 150000 {
		t.Errorf("escaped mount point: %+v", l)
	}
}

// FuzzCgroupLimit: whatever /proc/self/cgroup, mountinfo and the cgroup
// files hold, reading them neither panics nor yields a limit the files
// do not state.
func FuzzCgroupLimit(f *testing.F) {
	f.Add("0::/a\n", "25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "150000 100000\n", "-1\n", "0-1\n")
	f.Fuzz(func(t *testing.T, cgroup, mountinfo, cpuMax, cfsQuota, cpus string) {
		fsys := fstest.MapFS{
			"proc/self/cgroup":    file(cgroup),
			"proc/self/mountinfo": file(mountinfo),
		}
		for _, dir := range []string{"sys/fs/cgroup", "sys/fs/cgroup/a", "sys/fs/cgroup/cpu", "sys/fs/cgroup/cpuset"} {
			fsys[dir+"/cpu.max"] = file(cpuMax)
			fsys[dir+"/cpuset.cpus.effective"] = file(cpus)
			fsys[dir+"/cpuset.effective_cpus"] = file(cpus)
			fsys[dir+"/cpu.cfs_quota_us"] = file(cfsQuota)
			fsys[dir+"/cpu.cfs_period_us"] = file("100000\n")
		}
		l := cgroupLimit(fsys)
		if l.Period < 0 || l.Quota < 0 || (l.Period > 0) != (l.Quota > 0) || l.Cpuset < 0 || l.Cpuset > maxCPU {
			t.Fatalf("limit %+v", l)
		}
		if l.Cpuset != 0 && l.Cpuset != parseCPUList(cpus) {
			t.Fatalf("cpuset %d from %q", l.Cpuset, cpus)
		}
		l.Allowed = []int{0}
		if n := l.Count(); n != 1 {
			t.Fatalf("count %d with one CPU allowed", n)
		}
		_ = l.String()
	})
}
