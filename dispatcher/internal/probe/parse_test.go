package probe

import (
	"encoding/binary"
	"slices"
	"testing"
)

func TestParseSyscall(t *testing.T) {
	for in, want := range map[string]bool{
		"288 0x3 0x0 0x0 0x80800 0x0 0x0 0x7ffc5d5c8a28 0x7f2b1d0f3a5d\n": true,
		"7 0x7ffd12345678 0x2 0xffffffff 0x0 0x0 0x0 0x7ffd0 0x7f0\n":     true,
		"-1 0x7ffc5d5c8a28 0x7f2b1d0f3a5d\n":                              false, // blocked, not in a syscall
		"running\n":                                                       false,
		"":                                                                false,
		"288 0x3 0x0 0x0 0x80800 0x0\n":                                   false, // short
		"288 3 0x0 0x0 0x80800 0x0 0x0 0x1 0x2\n":                         false, // no 0x
		"99999999999 0x3 0x0 0x0 0x0 0x0 0x0 0x1 0x2\n":                   false,
	} {
		s, ok := parseSyscall([]byte(in))
		if ok != want {
			t.Errorf("parseSyscall(%q) ok = %v, want %v", in, ok, want)
		}
		if ok && in[0] == '2' && (s.nr != 288 || s.args[0] != 3 || s.args[3] != 0x80800) {
			t.Errorf("parseSyscall(%q) = %+v", in, s)
		}
	}
}

func TestParseSocketLink(t *testing.T) {
	for in, want := range map[string]uint64{
		"socket:[123456]": 123456, "socket:[]": 0, "socket:[12": 0, "pipe:[5]": 0,
		"anon_inode:[eventpoll]": 0, "socket:[-1]": 0, "/dev/null": 0,
	} {
		if got, ok := parseSocketLink(in); got != want || ok != (want != 0) {
			t.Errorf("parseSocketLink(%q) = %d, %v; want %d", in, got, ok, want)
		}
	}
}

func TestEpollTargets(t *testing.T) {
	info := "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n" +
		"tfd:        3 events:       19 data:                3  pos:0 ino:1a2b sdev:8\n" +
		"tfd:        9 events:        0 data:                9  pos:0 ino:ff sdev:8\n" +
		"tfd:       12 events: 8000201d data:   7f3c00000c  pos:0 ino:abc sdev:8\n" +
		"tfd: junk\ntfd:\n"
	type hit struct {
		fd  int
		ino uint64
	}
	var got []hit
	epollTargets([]byte(info), func(fd int, ino uint64) bool {
		got = append(got, hit{fd, ino})
		return false
	})
	want := []hit{{3, 0x1a2b}, {12, 0xabc}} // fd 9 has no EPOLLIN
	if !slices.Equal(got, want) {
		t.Errorf("targets %v, want %v", got, want)
	}
	if !epollTargets([]byte(info), func(fd int, ino uint64) bool { return ino == 0xabc }) {
		t.Error("stop on match: not reported")
	}
}

func TestPollSelectWaits(t *testing.T) {
	pfd := func(fd int32, ev uint16) []byte {
		b := make([]byte, 8)
		binary.NativeEndian.PutUint32(b, uint32(fd))
		binary.NativeEndian.PutUint16(b[4:], ev)
		return b
	}
	want := func(fd int) bool { return fd == 3 }
	if !pollWaits(append(pfd(5, 1), pfd(3, 1)...), want) {
		t.Error("poll on fd 3 for POLLIN: not seen")
	}
	if pollWaits(pfd(3, 4), want) || pollWaits(pfd(-3, 1), want) || pollWaits(pfd(3, 1)[:7], want) {
		t.Error("POLLOUT only, a negative fd or a short entry: seen as waiting")
	}
	set := make([]byte, 16)
	set[8] = 1 << 2 // fd 66
	if !selectWaits(set, 67, []int{66}) || selectWaits(set, 66, []int{66}) || selectWaits(set[:8], 67, []int{66}) {
		t.Error("select bitmap: wrong answer")
	}
}
