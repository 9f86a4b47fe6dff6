package balance

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// wakeWriterEnv makes the test binary the paced writer of
// BenchmarkWakeFloor instead of running tests: it writes one byte every
// interval (its value, a duration) on fd 3, count times.
const wakeWriterEnv = "COHORT_BALANCE_WAKE_WRITER"

func TestMain(m *testing.M) {
	if v := os.Getenv(wakeWriterEnv); v != "" {
		os.Exit(wakeWriter(v))
	}
	os.Exit(m.Run())
}

// wakeWriter is the writer process: "interval count".
func wakeWriter(spec string) int {
	f := strings.Fields(spec)
	if len(f) != 2 {
		fmt.Fprintf(os.Stderr, "wake writer: want \"INTERVAL COUNT\", got %q\n", spec)
		return 2
	}
	every, err1 := time.ParseDuration(f[0])
	count, err2 := strconv.Atoi(f[1])
	if err := errors.Join(err1, err2); err != nil {
		fmt.Fprintln(os.Stderr, "wake writer:", err)
		return 2
	}
	next := time.Now()
	for range count {
		next = next.Add(every)
		// Spin, not Sleep: Go's timers would coalesce 250 µs sleeps
		// into fewer, bigger writes, which the reader would count as
		// fewer wake-ups. The writer's CPU is not measured.
		for time.Now().Before(next) {
		}
		if _, err := unix.Write(3, []byte{1}); err != nil {
			fmt.Fprintln(os.Stderr, "wake writer:", err)
			return 1
		}
	}
	return 0
}

// BenchmarkWakeFloor measures the floor under the balancer's CPU per
// connection at a paced rate: what one wake-up costs a Go process that
// does nothing else. Another process writes one byte every 250 µs
// (4,000 a second, the cost benchmark's paced rate) on a socket this
// process reads in a goroutine parked in the netpoller; the process's
// own CPU time (getrusage) over the run, per byte, is what a single
// wake-up per connection costs before any accept, sendmsg or close.
// The round-robin dispatcher wakes at least once per connection when
// connections arrive one at a time (bench/cost.go's paced phase).
func BenchmarkWakeFloor(b *testing.B) {
	const (
		every = 250 * time.Microsecond
		count = 8000
	)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	mine := os.NewFile(uintptr(fds[0]), "wake-reader")
	theirs := os.NewFile(uintptr(fds[1]), "wake-writer")
	c, err := net.FileConn(mine)
	mine.Close()
	if err != nil {
		theirs.Close()
		b.Fatal(err)
	}
	defer c.Close()
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), wakeWriterEnv+"="+every.String()+" "+strconv.Itoa(count))
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		theirs.Close()
		b.Fatal(err)
	}
	theirs.Close()
	defer cmd.Wait()
	defer cmd.Process.Kill() // by pid; a no-op once it has exited

	cpu0 := processCPU(b)
	start := time.Now()
	buf := make([]byte, 64)
	got := 0
	wakes := 0
	c.SetReadDeadline(time.Now().Add(time.Minute))
	for got < count {
		n, err := c.Read(buf)
		if err != nil {
			b.Fatalf("after %d bytes: %v", got, err)
		}
		got += n
		wakes++
	}
	took := time.Since(start)
	used := processCPU(b) - cpu0
	b.Logf("%d bytes in %d reads over %v: %.1f µs of this process's CPU per wake-up (%.0f wake-ups/s)",
		got, wakes, took.Round(time.Millisecond), float64(used.Microseconds())/float64(wakes), float64(wakes)/took.Seconds())
	b.ReportMetric(float64(used.Nanoseconds())/float64(wakes), "cpu-ns/wake")
	for b.Loop() {
	}
}
