package cgroup

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
)

// MemoryCurrent is the memory charged to dir and its descendants, in
// bytes (memory.current): a worker's whole tree, its children included.
// It needs the memory controller.
func MemoryCurrent(dir string) (uint64, error) {
	s, err := readFile(filepath.Join(dir, "memory.current"))
	if err != nil {
		return 0, err
	}
	n, err := parseUint(s)
	if err != nil {
		return 0, fmt.Errorf("%s/memory.current: %w", dir, err)
	}
	return n, nil
}

// MemoryEvents are memory.events' counters: how often the cgroup (and
// its descendants) crossed memory.high (High), hit memory.max (Max), ran
// the OOM killer (OOM) and lost a process to it (OOMKill).
type MemoryEvents struct {
	Low, High, Max, OOM, OOMKill, OOMGroupKill uint64
}

// ReadMemoryEvents reads dir's memory.events.
func ReadMemoryEvents(dir string) (MemoryEvents, error) {
	s, err := readFile(filepath.Join(dir, "memory.events"))
	if err != nil {
		return MemoryEvents{}, err
	}
	e, err := ParseMemoryEvents(s)
	if err != nil {
		return MemoryEvents{}, fmt.Errorf("%s/memory.events: %w", dir, err)
	}
	return e, nil
}

// ParseMemoryEvents parses memory.events; keys it does not know are
// ignored (kernels add them).
func ParseMemoryEvents(s string) (MemoryEvents, error) {
	kv, err := ParseFlatKeyed(s)
	if err != nil {
		return MemoryEvents{}, err
	}
	return MemoryEvents{
		Low: kv["low"], High: kv["high"], Max: kv["max"],
		OOM: kv["oom"], OOMKill: kv["oom_kill"], OOMGroupKill: kv["oom_group_kill"],
	}, nil
}

// CPUStat is cpu.stat: CPU time used by the cgroup and its descendants
// (µs), and, with the cpu controller, how often cpu.max throttled it.
type CPUStat struct {
	UsageUsec, UserUsec, SystemUsec       uint64
	NrPeriods, NrThrottled, ThrottledUsec uint64
	HasThrottling                         bool // the cpu controller's keys are there
}

// ReadCPUStat reads dir's cpu.stat (present without the cpu controller
// too, with the usage keys only).
func ReadCPUStat(dir string) (CPUStat, error) {
	s, err := readFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return CPUStat{}, err
	}
	c, err := ParseCPUStat(s)
	if err != nil {
		return CPUStat{}, fmt.Errorf("%s/cpu.stat: %w", dir, err)
	}
	return c, nil
}

// ParseCPUStat parses cpu.stat; usage_usec must be there.
func ParseCPUStat(s string) (CPUStat, error) {
	kv, err := ParseFlatKeyed(s)
	if err != nil {
		return CPUStat{}, err
	}
	u, ok := kv["usage_usec"]
	if !ok {
		return CPUStat{}, fmt.Errorf("no usage_usec")
	}
	_, thr := kv["nr_periods"]
	return CPUStat{
		UsageUsec: u, UserUsec: kv["user_usec"], SystemUsec: kv["system_usec"],
		NrPeriods: kv["nr_periods"], NrThrottled: kv["nr_throttled"], ThrottledUsec: kv["throttled_usec"],
		HasThrottling: thr,
	}, nil
}

// Pressure is one PSI line pair of a pressure file: the share of time
// (percent, averaged over 10, 60 and 300 s) some or all ("full") of the
// cgroup's tasks stalled on the resource, and the total stall time (µs).
type Pressure struct {
	Some, Full PressureLine
	HasFull    bool // cpu.pressure has no full line on kernels before 5.13
}

// PressureLine is one line of a pressure file.
type PressureLine struct {
	Avg10, Avg60, Avg300 float64
	Total                uint64
}

// ReadPressure reads dir's RESOURCE.pressure (resource is "memory",
// "cpu" or "io"). A kernel without PSI (CONFIG_PSI off, or psi=0) has no
// such file or fails the read with EOPNOTSUPP: an error.
func ReadPressure(dir, resource string) (Pressure, error) {
	switch resource {
	case "memory", "cpu", "io":
	default:
		return Pressure{}, fmt.Errorf("pressure: unknown resource %q", resource)
	}
	s, err := readFile(filepath.Join(dir, resource+".pressure"))
	if err != nil {
		return Pressure{}, err
	}
	p, err := ParsePressure(s)
	if err != nil {
		return Pressure{}, fmt.Errorf("%s/%s.pressure: %w", dir, resource, err)
	}
	return p, nil
}

// ParsePressure parses "some avg10=0.00 avg60=0.00 avg300=0.00 total=0"
// and the optional "full …" line after it.
func ParsePressure(s string) (Pressure, error) {
	var p Pressure
	seen := 0
	for line := range strings.Lines(s) {
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			continue
		}
		kind, rest, _ := strings.Cut(line, " ")
		l, err := parsePressureLine(rest)
		if err != nil {
			return Pressure{}, fmt.Errorf("line %q: %w", line, err)
		}
		switch {
		case kind == "some" && seen == 0:
			p.Some, seen = l, 1
		case kind == "full" && seen == 1:
			p.Full, p.HasFull, seen = l, true, 2
		default:
			return Pressure{}, fmt.Errorf("unexpected line %q", line)
		}
	}
	if seen == 0 {
		return Pressure{}, fmt.Errorf("no some line")
	}
	return p, nil
}

func parsePressureLine(s string) (PressureLine, error) {
	var l PressureLine
	f := strings.Fields(s)
	if len(f) != 4 {
		return l, fmt.Errorf("want 4 fields, got %d", len(f))
	}
	avg := []*float64{&l.Avg10, &l.Avg60, &l.Avg300}
	for i, name := range []string{"avg10", "avg60", "avg300"} {
		v, ok := strings.CutPrefix(f[i], name+"=")
		if !ok {
			return l, fmt.Errorf("want %s=, got %q", name, f[i])
		}
		x, err := strconv.ParseFloat(v, 64)
		if err != nil || !(x >= 0 && x <= 100) { // NaN too
			return l, fmt.Errorf("%s: want a percentage, got %q", name, v)
		}
		*avg[i] = x
	}
	v, ok := strings.CutPrefix(f[3], "total=")
	if !ok {
		return l, fmt.Errorf("want total=, got %q", f[3])
	}
	t, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return l, fmt.Errorf("total: %w", err)
	}
	l.Total = t
	return l, nil
}
