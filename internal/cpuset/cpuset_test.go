package cpuset

import (
	"runtime"
	"slices"
	"strings"
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

// TestPin: a pinned thread may run on that CPU alone; a CPU the set
// cannot hold is an error that names it. (On a thread of its own, which
// is then dropped.)
func TestPin(t *testing.T) {
	cpus, err := Allowed()
	if err != nil {
		t.Fatal(err)
	}
	want := cpus[len(cpus)-1]
	done := make(chan []int)
	go func() {
		runtime.LockOSThread() // this thread ends with the goroutine
		if err := Pin(want); err != nil {
			t.Error(err)
		}
		got, _ := Allowed()
		done <- got
	}()
	if got := <-done; !slices.Equal(got, []int{want}) {
		t.Errorf("after Pin(%d) the thread may run on %v", want, got)
	}
	errc := make(chan error)
	go func() {
		runtime.LockOSThread()
		errc <- Pin(1 << 20)
	}()
	if err := <-errc; err == nil || !strings.Contains(err.Error(), "CPU 1048576") {
		t.Errorf("Pin(1<<20): %v, want an error naming the CPU", err)
	}
}
