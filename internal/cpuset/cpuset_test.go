package cpuset

import (
	"runtime"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// TestAllowed: the list is sched_getaffinity's set, in increasing order,
// and follows a narrowed affinity (on a thread of its own, which is then
// dropped).
func TestAllowed(t *testing.T) {
	cpus, err := Allowed()
	if err != nil {
		t.Fatal(err)
	}
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	if len(cpus) != set.Count() || !slices.IsSorted(cpus) {
		t.Fatalf("Allowed() = %v, sched_getaffinity has %d CPUs", cpus, set.Count())
	}
	done := make(chan []int)
	go func() {
		runtime.LockOSThread() // this thread ends with the goroutine
		var one unix.CPUSet
		one.Set(cpus[len(cpus)-1])
		if err := unix.SchedSetaffinity(0, &one); err != nil {
			t.Error(err)
			done <- nil
			return
		}
		got, err := Allowed()
		if err != nil {
			t.Error(err)
		}
		done <- got
	}()
	if got := <-done; !slices.Equal(got, cpus[len(cpus)-1:]) {
		t.Errorf("Allowed() pinned to CPU %d = %v", cpus[len(cpus)-1], got)
	}
}
