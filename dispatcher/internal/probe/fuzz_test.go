package probe

import (
	"bytes"
	"fmt"
	"strconv"
	"testing"
)

// FuzzParseSyscall: whatever a syscall file holds, parseSyscall does not
// panic, and what it accepts prints back to a line it parses the same.
func FuzzParseSyscall(f *testing.F) {
	for _, s := range []string{
		"288 0x3 0x0 0x0 0x80800 0x0 0x0 0x7ffc5d5c8a28 0x7f2b1d0f3a5d\n",
		"7 0x7ffd12345678 0x2 0xffffffff 0x0 0x0 0x0 0x7ffd0 0x7f0\n",
		"-1 0x7ffc5d5c8a28 0x7f2b1d0f3a5d\n", "running\n", "",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		s, ok := parseSyscall(b)
		if !ok {
			return
		}
		if s.nr < 0 {
			t.Fatalf("negative nr %d accepted", s.nr)
		}
		var line bytes.Buffer
		fmt.Fprintf(&line, "%d", s.nr)
		for _, a := range s.args {
			fmt.Fprintf(&line, " 0x%x", a)
		}
		line.WriteString(" 0x0 0x0\n")
		if s2, ok := parseSyscall(line.Bytes()); !ok || s2 != s {
			t.Fatalf("%q parsed as %+v; re-rendered %q parsed as %+v %v", b, s, line.String(), s2, ok)
		}
	})
}

// FuzzEpollTargets: an epoll fdinfo never panics the parser, and every
// target it reports has a non-negative fd that appears in the input.
func FuzzEpollTargets(f *testing.F) {
	f.Add([]byte("pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n" +
		"tfd:        3 events:       19 data:                3  pos:0 ino:1a2b sdev:8\n" +
		"tfd:        9 events:        0 data:                9  pos:0 ino:ff sdev:8\n"))
	f.Add([]byte("tfd: 5 events: zz ino:\ntfd:\ntfd: -1\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		epollTargets(b, func(fd int, ino uint64) bool {
			if fd < 0 || !bytes.Contains(b, []byte(strconv.Itoa(fd))) {
				t.Fatalf("target fd %d from %q", fd, b)
			}
			return false
		})
	})
}

// FuzzProcText: fd links and the poll and select arrays
// read from a process never panic their parsers, and what they return is
// in range.
func FuzzProcText(f *testing.F) {
	f.Add([]byte("1234 (node) S 1200 1234 1234 0 -1"), 3)
	f.Add([]byte("socket:[123456]"), 0)
	f.Add([]byte("1234 (a) b) S 7 1"), 64)
	f.Add([]byte{3, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0}, 1000)
	f.Fuzz(func(t *testing.T, b []byte, nfds int) {
		if ino, ok := parseSocketLink(string(b)); ok {
			if want := "socket:[" + strconv.FormatUint(ino, 10) + "]"; !bytes.HasPrefix(b, []byte("socket:[")) || len(want) > len(b) {
				t.Fatalf("%q parsed as inode %d", b, ino)
			}
		}
		pollWaits(b, func(fd int) bool {
			if fd < 0 {
				t.Fatalf("negative fd %d offered", fd)
			}
			return false
		})
		selectWaits(b, nfds, []int{0, 3, 63, 64, 1023, -1, nfds})
	})
}
