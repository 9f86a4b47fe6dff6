package probe

import (
	"bytes"
	"encoding/binary"
	"strconv"
)

// The parsers below read what the kernel writes under /proc. They never
// trust it to be well formed (a process may exit mid-read, a future kernel
// may add fields): anything unexpected is "no match", never a panic.

// syscallLine is /proc/PID/task/TID/syscall: "NR ARG1 … ARG6 SP PC" when
// the thread is blocked in a system call, "-1 SP PC" when it is blocked
// but not in one, "running" when it runs.
type syscallLine struct {
	nr   int64
	args [6]uint64
}

// parseSyscall parses a syscall file; ok is false for "running", "-1 …"
// and anything malformed.
func parseSyscall(b []byte) (s syscallLine, ok bool) {
	f := bytes.Fields(b)
	if len(f) < 1+6 {
		return s, false
	}
	nr, err := strconv.ParseInt(string(f[0]), 10, 32)
	if err != nil || nr < 0 {
		return s, false
	}
	s.nr = nr
	for i := range s.args {
		v, ok := parseHex(f[1+i])
		if !ok {
			return s, false
		}
		s.args[i] = v
	}
	return s, true
}

// parseHex parses "0x1f" (the kernel's %lx with a 0x prefix).
func parseHex(b []byte) (uint64, bool) {
	if len(b) < 3 || b[0] != '0' || b[1] != 'x' {
		return 0, false
	}
	v, err := strconv.ParseUint(string(b[2:]), 16, 64)
	return v, err == nil
}

// parseSocketLink returns the inode of a /proc/PID/fd/N link that reads
// "socket:[INODE]".
func parseSocketLink(s string) (uint64, bool) {
	const pre, post = "socket:[", "]"
	if len(s) <= len(pre)+len(post) || s[:len(pre)] != pre || s[len(s)-1] != ']' {
		return 0, false
	}
	v, err := strconv.ParseUint(s[len(pre):len(s)-1], 10, 64)
	return v, err == nil
}

// epollLink is what /proc/PID/fd/N reads for an epoll instance.
const epollLink = "anon_inode:[eventpoll]"

// epollTargets calls fn with the target fd and inode of every watched file
// in an epoll fdinfo (/proc/PID/fdinfo/N of an epoll fd), whose lines read
//
//	tfd:        3 events:       19 data:                3  pos:0 ino:1a2b sdev:8
//
// (ino: since Linux 3.8; ino is 0 when the kernel did not print it).
// Entries whose events (hex) lack EPOLLIN are skipped: a program that
// paused accepting may keep its listener registered with no events. It
// stops when fn returns true and reports whether it did.
func epollTargets(b []byte, fn func(fd int, ino uint64) bool) bool {
	for len(b) > 0 {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		rest, ok := bytes.CutPrefix(line, []byte("tfd:"))
		if !ok {
			continue
		}
		f := bytes.Fields(rest)
		if len(f) == 0 {
			continue
		}
		fd, err := strconv.Atoi(string(f[0]))
		if err != nil || fd < 0 {
			continue
		}
		var ino uint64
		in := true
		for i, kv := range f[1:] {
			if v, ok := bytes.CutPrefix(kv, []byte("ino:")); ok {
				if n, err := strconv.ParseUint(string(v), 16, 64); err == nil {
					ino = n
				}
			}
			if string(kv) == "events:" && i+2 < len(f) {
				if ev, err := strconv.ParseUint(string(f[i+2]), 16, 32); err == nil {
					in = ev&0x1 != 0 // EPOLLIN
				}
			}
		}
		if in && fn(fd, ino) {
			return true
		}
	}
	return false
}

// pollWaits reports whether a struct pollfd array (int fd; short events;
// short revents, native byte order) read from a process asks for input on
// one of the fds in want.
func pollWaits(b []byte, want func(fd int) bool) bool {
	const pollIn = 0x1 // POLLIN; POLLRDNORM (0x40) is what accept wakes too
	for ; len(b) >= 8; b = b[8:] {
		fd := int(int32(binary.NativeEndian.Uint32(b[0:4])))
		ev := binary.NativeEndian.Uint16(b[4:6])
		if fd >= 0 && ev&(pollIn|0x40) != 0 && want(fd) {
			return true
		}
	}
	return false
}

// selectWaits reports whether an fd_set bitmap (an array of longs, bit fd%64
// of long fd/64, native byte order) read from a process holds one of the
// fds in fds below nfds.
func selectWaits(b []byte, nfds int, fds []int) bool {
	for _, fd := range fds {
		if fd < 0 || fd >= nfds {
			continue
		}
		word := fd / 64
		if (word+1)*8 > len(b) {
			continue
		}
		if binary.NativeEndian.Uint64(b[word*8:])&(1<<(uint(fd)%64)) != 0 {
			return true
		}
	}
	return false
}
