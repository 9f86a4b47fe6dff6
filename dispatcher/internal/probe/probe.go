// Package probe tells, from /proc alone, whether a process (or one of its
// descendants) waits for connections on given sockets: a thread blocked in
// accept or accept4 on one of them, blocked in poll or select with one of
// them among the fds asked for input, or one of them in an epoll set of
// the process. It is how the dispatcher's ready = "listening" knows that a
// worker accepts without any cooperation from the program. Blocked, the
// list of the system calls a process's threads are blocked in that this
// rests on, is also how round-robin's balancer finds a close of its own
// that waits (dispatcher/internal/balance).
//
// What it reads needs the access the kernel gives a tracer: fd links and
// fdinfo need PTRACE_MODE_READ, /proc/PID/task/TID/syscall and
// /proc/PID/mem PTRACE_MODE_ATTACH. A supervisor has both over its own
// children when they run under its uid and stay dumpable (Yama's ptrace
// scope 1 allows ancestors); no capability is needed.
//
// It knows nothing of workers or the dispatcher; a check is a bounded
// number of small reads (see the max* constants) and never blocks on the
// inspected process.
package probe

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"syscall"

	"github.com/cohort-dev/cohort/dispatcher/internal/procfs"
)

// Bounds of one check, so that a process with a huge fd table or thread
// count costs a bounded amount of work.
const (
	maxFDs     = 4096      // fds of one process looked at
	maxTasks   = 1024      // threads of one process looked at
	maxTree    = 64        // descendants looked at
	maxFdinfo  = 256 << 10 // bytes of one epoll fdinfo
	maxPollfds = 4096      // struct pollfd entries read from a process
	maxSelect  = 1 << 16   // nfds of a select looked at
	maxSmall   = 4096      // bytes of a syscall or stat file
)

// ErrNoAccess is returned (wrapped) when the process itself cannot be
// inspected: another uid, a non-dumpable program, a Yama ptrace scope
// that forbids it, or a kernel without /proc/PID/syscall.
var ErrNoAccess = errors.New("cannot inspect the process through /proc")

// Targets are the sockets a check looks for.
type Targets struct {
	// Inodes are the sockets' inode numbers (st_ino of an fstat of one
	// copy of each; every copy in every process has the same).
	Inodes []uint64
	// Channel says the sockets are connected ones that the process reads
	// (round-robin channels: recvmsg, recvfrom, read) instead of
	// listeners that it accepts on.
	Channel bool
}

// Found says who waits, and how, for a log line.
type Found struct {
	PID int    // 0: nobody waits
	How string // "accept4 on fd 3 (thread 1234)", "epoll fd 7 watches fd 3", …
}

// Accepting reports whether pid, or with children one of its
// descendants (when pid itself does not), waits on one of t's sockets. A
// process that has exited waits on nothing (no error); when pid itself
// cannot be inspected the error wraps ErrNoAccess. Descendants that cannot
// be inspected are skipped. Looking for descendants reads every
// /proc/PID/stat there is, so a caller that checks often asks for them
// less often; ctx cuts that scan short.
func Accepting(ctx context.Context, pid int, t Targets, children bool) (Found, error) {
	if len(t.Inodes) == 0 {
		return Found{}, nil
	}
	f, err := inspect(pid, t)
	if err != nil || f.PID != 0 || !children {
		return f, err
	}
	for _, c := range descendants(ctx, pid) {
		if f, err := inspect(c, t); err == nil && f.PID != 0 {
			return f, nil
		}
	}
	return Found{}, nil
}

// inspect checks one process.
func inspect(pid int, t Targets) (Found, error) {
	base := "/proc/" + strconv.Itoa(pid)
	fds, epolls, err := targetFDs(base, t.Inodes)
	if err != nil {
		return Found{}, accessErr(pid, err)
	}
	if len(fds) == 0 {
		return Found{}, nil // holds none of the sockets (yet)
	}
	found := func(how string, args ...any) (Found, error) {
		return Found{PID: pid, How: fmt.Sprintf(how, args...)}, nil
	}
	for _, e := range epolls {
		b, err := readBounded(base+"/fdinfo/"+strconv.Itoa(e), maxFdinfo)
		if err != nil {
			continue
		}
		var hit int
		if epollTargets(b, func(fd int, ino uint64) bool {
			hit = fd
			if ino != 0 {
				return slices.Contains(t.Inodes, ino)
			}
			return slices.Contains(fds, fd)
		}) {
			return found("epoll fd %d watches fd %d", e, hit)
		}
	}

	calls, err := Blocked(pid)
	if err != nil {
		return Found{}, err
	}
	var mem *os.File
	defer func() {
		if mem != nil {
			mem.Close()
		}
	}()
	read := func(addr uint64, n int) []byte {
		if mem == nil {
			var err error
			if mem, err = os.Open(base + "/mem"); err != nil {
				return nil
			}
		}
		b := make([]byte, n)
		if addr > 1<<63-1 {
			return nil
		}
		got, _ := mem.ReadAt(b, int64(addr))
		return b[:got]
	}
	for _, c := range calls {
		fd := int(int32(c.Args[0]))
		switch k := kindOf(c.NR); {
		case k == waitAccept && !t.Channel, k == waitRead && t.Channel:
			if slices.Contains(fds, fd) {
				return found("%s on fd %d (thread %d)", syscallName(c.NR), fd, c.TID)
			}
		case k == waitPoll:
			n := min(c.Args[1], maxPollfds)
			if pollWaits(read(c.Args[0], int(n)*8), func(fd int) bool { return slices.Contains(fds, fd) }) {
				return found("%s on one of fds %v (thread %d)", syscallName(c.NR), fds, c.TID)
			}
		case k == waitSelect:
			nfds := int(min(c.Args[0], maxSelect))
			if c.Args[1] != 0 && selectWaits(read(c.Args[1], (nfds+63)/64*8), nfds, fds) {
				return found("%s on one of fds %v (thread %d)", syscallName(c.NR), fds, c.TID)
			}
		}
	}
	return Found{}, nil
}

// Call is a system call that a thread is blocked in.
type Call struct {
	TID  int
	NR   int64     // the call's number (unix.SYS_…)
	Args [6]uint64 // its arguments, as the thread passed them
}

// Blocked lists the threads of pid (at most maxTasks of them) that are
// blocked in a system call, with the call. Threads that run or wait to
// run, or sleep outside a system call, are not listed; neither are
// threads that end meanwhile. When pid cannot be inspected the error wraps
// ErrNoAccess; a process that has exited has no threads (no error).
func Blocked(pid int) ([]Call, error) {
	base := "/proc/" + strconv.Itoa(pid) + "/task/"
	tasks, err := readNames(base, maxTasks)
	if err != nil {
		return nil, accessErr(pid, err)
	}
	var calls []Call
	for i, tid := range tasks {
		b, err := readBounded(base+tid+"/syscall", maxSmall)
		if err != nil {
			if i == 0 && errors.Is(err, fs.ErrPermission) {
				return nil, accessErr(pid, err)
			}
			continue
		}
		s, ok := parseSyscall(b)
		n, err := strconv.Atoi(tid)
		if !ok || err != nil {
			continue
		}
		calls = append(calls, Call{TID: n, NR: s.nr, Args: s.args})
	}
	return calls, nil
}

// accessErr turns a permission error into ErrNoAccess, and "the process
// is gone" into no error.
func accessErr(pid int, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ESRCH):
		return nil
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("pid %d: %w: %v", pid, ErrNoAccess, err)
	}
	return fmt.Errorf("pid %d: %w", pid, err)
}

// targetFDs lists the fds of the process under base that are one of the
// sockets, and its epoll fds.
func targetFDs(base string, inodes []uint64) (fds, epolls []int, err error) {
	names, err := readNames(base+"/fd", maxFDs)
	if err != nil {
		return nil, nil, err
	}
	for _, n := range names {
		fd, err := strconv.Atoi(n)
		if err != nil {
			continue
		}
		link, err := os.Readlink(base + "/fd/" + n)
		if err != nil {
			continue // closed meanwhile
		}
		if link == epollLink {
			epolls = append(epolls, fd)
		} else if ino, ok := parseSocketLink(link); ok && slices.Contains(inodes, ino) {
			fds = append(fds, fd)
		}
	}
	return fds, epolls, nil
}

// descendants lists pid's descendants (breadth first, at most maxTree)
// by their parent pids in /proc/*/stat (procfs.Scan):
// /proc/PID/task/*/children is not in every kernel. Processes that
// another uid owns are invisible under ProtectProc=invisible and are no
// worker's anyway. A scan cut short by ctx gives what it found.
func descendants(ctx context.Context, pid int) []int {
	t, _ := procfs.Scan(ctx)
	return t.Descendants(pid, maxTree)
}

// readNames lists at most max entries of a directory, unsorted.
func readNames(dir string, max int) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	names, err := f.Readdirnames(max)
	if err != nil && err != io.EOF {
		return nil, err
	}
	return names, nil
}

// readBounded reads at most max bytes of a /proc file.
func readBounded(path string, max int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, int64(max)))
	if err != nil {
		return nil, err
	}
	return b, nil
}
