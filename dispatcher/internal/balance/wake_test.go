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
	if v := os.Getenv(loopMechEnv); v != "" {
		os.Exit(loopProcess(v))
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
// process waits on; the process's own CPU time (getrusage) over the run,
// per wake-up, is what a single wake-up per connection costs before any
// accept, sendmsg or close. Two ways of waiting, in the same run:
//
//   - netpoller: a goroutine parked in Go's netpoller (a net.Conn Read),
//     how the event loops waited before;
//   - loop: an event loop's own wait (loop.wait: a blocking epoll_wait
//     made with RawSyscall, the goroutine keeping its thread), how they
//     wait now.
func BenchmarkWakeFloor(b *testing.B) {
	const (
		every = 250 * time.Microsecond
		count = 8000
	)
	perWake := map[string]float64{}
	for _, way := range []string{"netpoller", "loop"} {
		b.Run(way, func(b *testing.B) {
			ns := wakeFloor(b, way, every, count)
			perWake[way] = ns
			if base := perWake["netpoller"]; way == "loop" && base > 0 {
				b.Logf("netpoller ÷ loop, CPU per wake-up: %.2f×", base/ns)
			}
			for b.Loop() {
			}
			b.ReportMetric(ns, "cpu-ns/wake") // after the loop, which resets reported metrics
		})
	}
}

// wakeFloor runs the writer and waits for its bytes one way; it returns
// this process's CPU nanoseconds per wake-up.
func wakeFloor(b *testing.B, way string, every time.Duration, count int) float64 {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	mine := os.NewFile(uintptr(fds[0]), "wake-reader")
	theirs := os.NewFile(uintptr(fds[1]), "wake-writer")
	defer mine.Close()
	var read func(buf []byte) (int, error)
	switch way {
	case "netpoller":
		c, err := net.FileConn(mine)
		if err != nil {
			theirs.Close()
			b.Fatal(err)
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(time.Minute))
		read = c.Read
	case "loop":
		l, err := newLoop()
		if err != nil {
			theirs.Close()
			b.Fatal(err)
		}
		defer l.close()
		if err := unix.SetNonblock(fds[0], true); err != nil {
			b.Fatal(err)
		}
		if err := l.ctl(unix.EPOLL_CTL_ADD, fds[0], 0, unix.EPOLLIN); err != nil {
			b.Fatal(err)
		}
		events := make([]unix.EpollEvent, maxEvents)
		read = func(buf []byte) (int, error) {
			for {
				if _, _, err := l.wait(events, int(time.Minute/time.Millisecond)); err != nil {
					return 0, err
				}
				n, err := unix.Read(fds[0], buf)
				if err != unix.EAGAIN {
					return n, err
				}
			}
		}
	}
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
	got, wakes := 0, 0
	for got < count {
		n, err := read(buf)
		if err != nil {
			b.Fatalf("after %d bytes: %v", got, err)
		}
		got += n
		wakes++
	}
	took := time.Since(start)
	used := processCPU(b) - cpu0
	b.Logf("%s: %d bytes in %d reads over %v: %.1f µs of this process's CPU per wake-up (%.0f wake-ups/s)",
		way, got, wakes, took.Round(time.Millisecond), float64(used.Microseconds())/float64(wakes), float64(wakes)/took.Seconds())
	return float64(used.Nanoseconds()) / float64(wakes)
}
