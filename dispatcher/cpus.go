package dispatcher

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// AllowedCPUs returns the CPUs the calling thread may run on
// (sched_getaffinity), in increasing order: what CPUAffinity= and the
// cgroup's cpuset leave to the service. workers = "auto" starts one
// worker per entry; cpu_affinity = true pins worker i to entry i.
func AllowedCPUs() ([]int, error) {
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
