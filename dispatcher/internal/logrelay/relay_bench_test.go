package logrelay

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/journal"
	"golang.org/x/sys/unix"
)

// helperJournalSink stands in for journald in BenchmarkRelay, in a
// process of its own so that its CPU time is not the dispatcher's: it
// reads datagrams on $SINK_PATH until one is "END", then prints how many
// came before.
func helperJournalSink() int {
	path := os.Getenv("SINK_PATH")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	conn.SetReadBuffer(8 << 20)
	os.WriteFile(path+".ready", nil, 0o600)
	buf := make([]byte, 1<<16)
	n := 0
	for {
		k, err := conn.Read(buf)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if string(buf[:k]) == "END" {
			fmt.Println(n)
			return 0
		}
		n++
	}
}

// benchLines is how many lines the flooding child writes per iteration.
const benchLines = 200000

// BenchmarkRelay measures the relay of worker lines to the journal: a
// real child process floods a real pipe with 64-byte lines, copyLines
// reads it and sends each line as a native-protocol datagram to a
// stand-in journald (another process). It reports lines/s through the
// whole path and the dispatcher's own CPU time per line (getrusage
// RUSAGE_SELF: this process only; the flooder and the sink are
// children). Sub-benchmarks: "under-budget" (the limiter passes every
// line: the common path) and "over-budget" (burst 1000 of 200000: what a
// flood costs when the limiter drops).
func BenchmarkRelay(b *testing.B) {
	for _, c := range []struct {
		name  string
		burst int
	}{{"under-budget", 10 * benchLines}, {"over-budget", 1000}} {
		b.Run(c.name, func(b *testing.B) { benchRelay(b, c.burst) })
	}
}

func benchRelay(b *testing.B, burst int) {
	var cpu time.Duration
	var wall time.Duration
	lines := 0
	for range b.N {
		dir := b.TempDir()
		path := filepath.Join(dir, "j.sock")
		sink := exec.Command(os.Args[0])
		sink.Env = append(os.Environ(), "COHORT_TEST_HELPER=journal-sink", "SINK_PATH="+path)
		var sinkOut bytes.Buffer
		sink.Stdout, sink.Stderr = &sinkOut, &sinkOut
		if err := sink.Start(); err != nil {
			b.Fatal(err)
		}
		for i := 0; ; i++ {
			if _, err := os.Stat(path + ".ready"); err == nil {
				break
			}
			if i > 500 {
				sink.Process.Kill()
				b.Fatalf("the sink did not start: %s", sinkOut.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
		jw := journal.NewSender(path)
		o := New(Config{App: "bench", Stdout: io.Discard, Stderr: io.Discard, Journal: jw,
			RateLimit: appfile.LogRateLimit{Interval: time.Hour, Burst: burst}})
		r, w, err := os.Pipe()
		if err != nil {
			b.Fatal(err)
		}
		flood := exec.Command("/bin/sh", "-c", fmt.Sprintf("yes %s | head -n %d", strings.Repeat("x", 63), benchLines))
		flood.Stdout = w
		if err := flood.Start(); err != nil {
			b.Fatal(err)
		}
		w.Close()
		var ru0, ru1 unix.Rusage
		unix.Getrusage(unix.RUSAGE_SELF, &ru0)
		start := time.Now()
		o.CopyLines(Tag{Index: 0, PID: flood.Process.Pid, Gen: 1}, r)
		// The end mark, on a socket of its own: the sink's queue keeps
		// the order of sends, from whichever socket.
		if err := sendEnd(path); err != nil {
			b.Fatal(err)
		}
		wall += time.Since(start)
		unix.Getrusage(unix.RUSAGE_SELF, &ru1)
		cpu += time.Duration(unix.TimevalToNsec(ru1.Utime)-unix.TimevalToNsec(ru0.Utime)) + time.Duration(unix.TimevalToNsec(ru1.Stime)-unix.TimevalToNsec(ru0.Stime))
		flood.Wait()
		if err := sink.Wait(); err != nil {
			b.Fatalf("sink: %v: %s", err, sinkOut.String())
		}
		got, _ := strconv.Atoi(strings.TrimSpace(sinkOut.String()))
		if want := min(burst, benchLines); got != want {
			b.Fatalf("the sink got %d datagrams, want %d", got, want)
		}
		o.Close()
		jw.Close()
		lines += benchLines
	}
	b.ReportMetric(float64(lines)/wall.Seconds(), "lines/s")
	b.ReportMetric(float64(cpu.Microseconds())/float64(lines), "cpu-µs/line")
}

// sendEnd sends the sink's end mark, a datagram that is no entry.
func sendEnd(path string) error {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Sendmsg(fd, []byte("END"), nil, &unix.SockaddrUnix{Name: path}, 0)
}

// TestMain runs the test binary as the journal sink when asked to.
func TestMain(m *testing.M) {
	if os.Getenv("COHORT_TEST_HELPER") == "journal-sink" {
		os.Exit(helperJournalSink())
	}
	os.Exit(m.Run())
}
