//go:build !amd64

package probe

import "golang.org/x/sys/unix"

// kindOf sorts the system calls a thread may wait for a connection in.
// Newer architectures (arm64, riscv64, loong64) have only the generic
// calls: no accept, poll or select.
func kindOf(nr int64) waitKind {
	switch nr {
	case unix.SYS_ACCEPT4:
		return waitAccept
	case unix.SYS_RECVMSG, unix.SYS_RECVFROM, unix.SYS_RECVMMSG, unix.SYS_READ:
		return waitRead
	case unix.SYS_PPOLL:
		return waitPoll
	case unix.SYS_PSELECT6:
		return waitSelect
	}
	return waitOther
}

func syscallName(nr int64) string { return commonName(nr) }
