package cgroup

import (
	"strings"
	"testing"
)

// FuzzParse: whatever a cgroup file, /proc/self/cgroup or a mountinfo
// line holds, the parsers return an error or figures within the kernel's
// own bounds, and never panic. The seed corpus (testdata/fuzz/FuzzParse)
// holds what real kernels write.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"usage_usec 2000\nuser_usec 1500\nsystem_usec 500\nnr_periods 10\nnr_throttled 4\nthrottled_usec 800\n",
		"low 0\nhigh 12\nmax 3\noom 2\noom_kill 1\noom_group_kill 1\n",
		"some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\nfull avg10=0.50 avg60=0.10 avg300=0.00 total=678\n",
		"populated 1\nfrozen 0\n",
		"0::/system.slice/web.service/supervisor\n",
		"35 25 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
		"123456789\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if kv, err := ParseFlatKeyed(s); err == nil && len(kv) > 64 {
			t.Errorf("ParseFlatKeyed: %d keys", len(kv))
		}
		ParseMemoryEvents(s)
		if c, err := ParseCPUStat(s); err == nil && !strings.Contains(s, "usage_usec ") {
			t.Errorf("ParseCPUStat without usage_usec: %+v", c)
		}
		if p, err := ParsePressure(s); err == nil {
			for _, l := range []PressureLine{p.Some, p.Full} {
				for _, a := range []float64{l.Avg10, l.Avg60, l.Avg300} {
					if !(a >= 0 && a <= 100) {
						t.Errorf("ParsePressure: average %v", a)
					}
				}
			}
		}
		if p, ok := ParseProcCgroup(s); ok && !strings.HasPrefix(p, "/") {
			t.Errorf("ParseProcCgroup: %q", p)
		}
		if m, ok := ParseMountLine(s); ok {
			if !strings.HasPrefix(m.Point, "/") || !strings.HasPrefix(m.Root, "/") {
				t.Errorf("ParseMountLine: %+v", m)
			}
			if dir, err := Join(m.Point, m.Root, m.Root+"/x"); err == nil && !strings.HasPrefix(dir, strings.TrimSuffix(m.Point, "/")) {
				t.Errorf("Join escaped the mount: %q", dir)
			}
		}
		for _, m := range ParseMemberships(s) {
			if !strings.HasPrefix(m.Path, "/") {
				t.Errorf("ParseMemberships: %+v", m)
			}
		}
		parseUint(s)
	})
}
