// Package cpuset reads the set of CPUs a process may run on and how many
// of them its cgroups let it use (Limit: affinity, cpuset, CPU quota),
// the one answer that the generator (counting workers = "auto") and the
// dispatcher (starting and pinning workers) must agree on, and pins a
// worker to one of them (cpu_affinity = true).
package cpuset

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Allowed returns the CPUs the calling thread may run on
// (sched_getaffinity), in increasing order: what CPUAffinity= and the
// cgroup's cpuset leave to the service. It never returns an empty list
// without an error.
func Allowed() ([]int, error) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return nil, fmt.Errorf("sched_getaffinity: %w", err)
	}
	var cpus []int
	for i := range len(set) * 64 {
		if set.IsSet(i) {
			cpus = append(cpus, i)
		}
	}
	if len(cpus) == 0 {
		return nil, fmt.Errorf("sched_getaffinity: empty CPU set")
	}
	return cpus, nil
}

// Pin sets the calling thread's affinity to cpu alone
// (sched_setaffinity). Affinity is per thread and exec keeps the calling
// thread's, so a caller that execs next locks itself to its OS thread
// first. The error names the CPU.
func Pin(cpu int) error {
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("sched_setaffinity to CPU %d: %w", cpu, err)
	}
	return nil
}
