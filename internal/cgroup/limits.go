package cgroup

import (
	"fmt"
	"slices"
	"strconv"

	"github.com/cohort-dev/cohort/appfile"
)

// cpuPeriod is cpu.max's period (µs): the kernel's and systemd's default,
// so that CPUQuota=150% and cpu_quota = "150%" write the same file.
const cpuPeriod = 100000

// Needs lists the controllers l's limits are written through; memory
// always comes first when the status figures want it (memory.current).
func Needs(l appfile.Limits) []string {
	var c []string
	if l.MemoryHigh != 0 || l.MemoryMax != 0 || l.MemorySwapMax != 0 {
		c = append(c, Memory)
	}
	if l.CPUWeight != 0 || l.CPUQuota != 0 {
		c = append(c, CPU)
	}
	if l.TasksMax != 0 {
		c = append(c, Pids)
	}
	return c
}

// Missing is the first controller of need that have lacks; "" when none.
func Missing(need, have []string) string {
	for _, c := range need {
		if !slices.Contains(have, c) {
			return c
		}
	}
	return ""
}

// WriteLimits writes l into the cgroup dir, a new one with no process in
// it yet, whose controllers are have (its cgroup.controllers). With the
// memory controller memory.oom.group is set as well, so that an OOM kill
// takes the worker's whole tree and leaves no half a worker serving.
func WriteLimits(dir string, l appfile.Limits, have []string) error {
	if c := Missing(Needs(l), have); c != "" {
		return fmt.Errorf("cgroup %s: [limits] need the %s controller, which is not enabled for it (cgroup.controllers: %q)", dir, c, have)
	}
	type file struct{ name, value string }
	var files []file
	if slices.Contains(have, Memory) {
		files = append(files, file{"memory.oom.group", "1"})
	}
	size := func(n int64) string {
		if n == appfile.SwapNone {
			return "0"
		}
		return strconv.FormatInt(n, 10)
	}
	// memory.max before memory.high: a high above the current max is
	// accepted either way, but this order never leaves a moment with a
	// high and no max.
	if l.MemoryMax != 0 {
		files = append(files, file{"memory.max", size(l.MemoryMax)})
	}
	if l.MemoryHigh != 0 {
		files = append(files, file{"memory.high", size(l.MemoryHigh)})
	}
	if l.MemorySwapMax != 0 {
		files = append(files, file{"memory.swap.max", size(l.MemorySwapMax)})
	}
	if l.CPUWeight != 0 {
		files = append(files, file{"cpu.weight", strconv.Itoa(l.CPUWeight)})
	}
	if l.CPUQuota != 0 {
		files = append(files, file{"cpu.max", fmt.Sprintf("%d %d", int64(l.CPUQuota)*cpuPeriod/100, cpuPeriod)})
	}
	if l.TasksMax != 0 {
		files = append(files, file{"pids.max", strconv.Itoa(l.TasksMax)})
	}
	for _, f := range files {
		if err := write(dir, f.name, f.value); err != nil {
			return err
		}
	}
	return nil
}
