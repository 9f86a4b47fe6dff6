package dispatcher

import "github.com/cohort-dev/cohort/internal/cpuset"

// AllowedCPUs returns the CPUs the calling thread may run on
// (sched_getaffinity), in increasing order: what CPUAffinity= and the
// cgroup's cpuset leave to the service. workers = "auto" starts one
// worker per entry; cpu_affinity = true pins worker i to entry i. It is
// cpuset.Allowed, which the generator counts with too.
func AllowedCPUs() ([]int, error) { return cpuset.Allowed() }
