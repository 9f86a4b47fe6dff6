package control

import (
	"errors"
	"fmt"
	"net"

	"github.com/cohort-dev/cohort/dispatcher/internal/procfs"
	"golang.org/x/sys/unix"
)

// soPeerPidfd is SO_PEERPIDFD (Linux 6.5, include/uapi/asm-generic/socket.h;
// the same number on amd64, arm64 and every other asm-generic
// architecture), which x/sys does not name yet: a pidfd for the process
// that called connect(), taken by the kernel at that moment.
const soPeerPidfd = 77

// maxDepth bounds the walk up a process's ancestry (and its retries when an
// ancestor exits during the walk). Real trees are a few levels deep; a peer
// deeper than this is treated as a worker.
const maxDepth = 256

// peer is what the server knows of a connecting process.
type peer struct {
	pid int
	uid uint32
	// worker: the peer is in the supervisor's process tree, or where it
	// is could not be established (it exited, it is in another pid
	// namespace, its ancestry could not be read). Either way it gets only
	// read-only commands.
	worker bool
	// key groups connections for the per-peer limit: the peer's pid, or
	// for a worker the top of its tree below the supervisor (the worker
	// process itself, or an orphan the supervisor adopted).
	key int
	// why says, for a worker, what placed it there (for messages).
	why string
}

// identify asks the kernel who is at the other end of conn and where that
// process sits relative to the supervisor (a pid); self is this process's
// uid.
//
// Why it holds against pid reuse: SO_PEERCRED's pid is a number, and the
// process may have exited and its number gone to another process by the
// time /proc is read. So identify first takes a pidfd for the peer
// (SO_PEERPIDFD: the kernel's reference to the process that connected,
// from Linux 6.5; older kernels: pidfd_open right after accept), walks
// /proc, and then checks that the pidfd's process is still there: a
// process that has not been reaped keeps its pid, so every /proc/<pid>
// read in between was about that process. A peer that is gone is a worker.
// Each step up the ancestry re-reads the child's parent after reading the
// parent's stat, so an ancestor that exits mid-walk (its children go to
// the nearest subreaper, which is the supervisor for a worker's orphans)
// is noticed instead of followed into a reused pid.
func identify(conn *net.UnixConn, supervisor int, self uint32) (peer, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return peer{}, err
	}
	var cred *unix.Ucred
	var credErr error
	pidfd := -1
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr == nil {
			if pfd, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, soPeerPidfd); err == nil {
				pidfd = pfd
			}
		}
	}); err != nil {
		return peer{}, err
	}
	defer func() {
		if pidfd >= 0 {
			unix.Close(pidfd)
		}
	}()
	if credErr != nil {
		return peer{}, fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	p := peer{pid: int(cred.Pid), uid: cred.Uid, key: int(cred.Pid)}
	if p.uid == 0 && self != 0 {
		// Root, talking to a dispatcher that is not root. Workers run as
		// the dispatcher's uid; one that became root (a set-uid program,
		// file capabilities; the generated units forbid both with
		// NoNewPrivileges= and an empty CapabilityBoundingSet=) could
		// ptrace or kill the dispatcher anyway. And with ProtectProc=
		// invisible the dispatcher cannot even read root's /proc entries,
		// so the walk below would fail.
		return p, nil
	}
	if p.pid <= 0 {
		// The peer is in a pid namespace this one cannot see into.
		p.worker, p.why = true, "its pid is not visible here"
		return p, nil
	}
	if pidfd < 0 {
		// Before Linux 6.5. The pid is the connecting process's unless it
		// exited and the kernel cycled through every pid up to pid_max
		// between its connect() and this accept().
		pidfd, err = unix.PidfdOpen(p.pid, 0)
		if err != nil {
			pidfd = -1
			p.worker, p.why = true, "it exited before it could be identified"
			return p, nil
		}
	}
	if p.pid == supervisor {
		return p, nil
	}
	in, top, err := descends(p.pid, supervisor)
	switch {
	case err != nil:
		p.worker, p.why = true, err.Error()
	case in:
		p.worker, p.key, p.why = true, top, fmt.Sprintf("it descends from pid %d, the dispatcher", supervisor)
	}
	// Still there? (EPERM: there, but ours may not signal it.)
	if err := unix.PidfdSendSignal(pidfd, 0, nil, 0); err != nil && !errors.Is(err, unix.EPERM) {
		p.worker, p.key, p.why = true, p.pid, "it exited before it could be identified"
	}
	return p, nil
}

// descends reports whether pid is a descendant of root, and if so which
// child of root its branch hangs from.
func descends(pid, root int) (bool, int, error) {
	child := pid
	parent, err := parentOf(child)
	if err != nil {
		return false, 0, err
	}
	for range maxDepth {
		if parent == root {
			return true, child, nil
		}
		if parent <= 1 {
			// init, or 0: a parent outside this pid namespace. (root is
			// checked first: a supervisor that is pid 1 in a container
			// has every process of the container below it.)
			return false, 0, nil
		}
		grand, gerr := parentOf(parent)
		again, err := parentOf(child)
		if err != nil {
			return false, 0, err
		}
		if again != parent {
			// parent exited while we looked and child was re-parented:
			// follow its new parent instead.
			parent = again
			continue
		}
		if gerr != nil {
			return false, 0, gerr
		}
		child, parent = parent, grand
	}
	return false, 0, fmt.Errorf("its ancestry is deeper than %d or keeps changing", maxDepth)
}

// parentOf reads a process's parent pid from /proc/<pid>/stat
// (procfs.Stat, a bounded read).
func parentOf(pid int) (int, error) {
	p, err := procfs.Stat(pid)
	if err != nil {
		return 0, fmt.Errorf("its ancestry cannot be read: %w", err)
	}
	return p.PPID, nil
}
