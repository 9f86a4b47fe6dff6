package rr

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// processCPU is this process's CPU time (user + system) from /proc/self/stat.
func processCPU(b *testing.B) time.Duration {
	raw, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		b.Fatal(err)
	}
	s := string(raw)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * (time.Second / 100) // USER_HZ
}

// BenchmarkChannelRoundTrip is one connection's life on the dispatcher's
// side of a channel, sequentially: Send (or TrySend) of one conn, the
// worker's Recv and ACK, and the Channel's Recv, which closes the
// dispatcher's copy. It prices the Channel's bookkeeping (deadlines, open
// ids) against the syscalls it makes; compare Send with TrySend, and with
// the same benchmark at an older commit. cpu-ns/op is the process's CPU
// time (from /proc) per round trip: on a busy machine ns/op mostly counts
// waiting.
func BenchmarkChannelRoundTrip(b *testing.B) {
	for _, mode := range []string{"Send", "TrySend"} {
		b.Run(mode, func(b *testing.B) {
			ch, w := newPair(b)
			ids := make([]uint64, 1)
			cpu0 := processCPU(b)
			for i := 0; b.Loop(); i++ {
				fd, err := unix.Open(os.DevNull, unix.O_RDONLY|unix.O_CLOEXEC, 0)
				if err != nil {
					b.Fatal(err)
				}
				c := NewConn(fd, 0)
				c.ID = uint64(i)
				if mode == "Send" {
					err = ch.Send(c)
				} else {
					_, err = ch.TrySend(c)
				}
				if err != nil {
					b.Fatal(err)
				}
				ds, err := w.Recv()
				if err != nil || len(ds) != 1 {
					b.Fatal(ds, err)
				}
				ds[0].File.Close()
				ids[0] = ds[0].ID
				if err := w.Send(TypeAck, ids); err != nil {
					b.Fatal(err)
				}
				if _, err := ch.Recv(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(processCPU(b)-cpu0)/float64(b.N), "cpu-ns/op")
		})
	}
}
