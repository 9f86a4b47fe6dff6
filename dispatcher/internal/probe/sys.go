package probe

import (
	"strconv"

	"golang.org/x/sys/unix"
)

// waitKind is how a blocked system call may be waiting for a connection.
type waitKind int

const (
	waitOther  waitKind = iota
	waitAccept          // accept, accept4: first argument is the fd
	waitRead            // recvmsg, recvfrom, recvmmsg, read: first argument is the fd
	waitPoll            // poll, ppoll: struct pollfd *fds, nfds
	waitSelect          // select, pselect6: nfds, fd_set *readfds
)

func commonName(nr int64) string {
	switch nr {
	case unix.SYS_ACCEPT4:
		return "accept4"
	case unix.SYS_RECVMSG:
		return "recvmsg"
	case unix.SYS_RECVFROM:
		return "recvfrom"
	case unix.SYS_RECVMMSG:
		return "recvmmsg"
	case unix.SYS_READ:
		return "read"
	case unix.SYS_PPOLL:
		return "ppoll"
	case unix.SYS_PSELECT6:
		return "pselect6"
	}
	return "syscall " + strconv.FormatInt(nr, 10)
}
