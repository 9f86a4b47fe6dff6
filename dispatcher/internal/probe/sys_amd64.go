package probe

import "golang.org/x/sys/unix"

// kindOf sorts the system calls a thread may wait for a connection in.
func kindOf(nr int64) waitKind {
	switch nr {
	case unix.SYS_ACCEPT, unix.SYS_ACCEPT4:
		return waitAccept
	case unix.SYS_RECVMSG, unix.SYS_RECVFROM, unix.SYS_RECVMMSG, unix.SYS_READ:
		return waitRead
	case unix.SYS_POLL, unix.SYS_PPOLL:
		return waitPoll
	case unix.SYS_SELECT, unix.SYS_PSELECT6:
		return waitSelect
	}
	return waitOther
}

func syscallName(nr int64) string {
	switch nr {
	case unix.SYS_ACCEPT:
		return "accept"
	case unix.SYS_POLL:
		return "poll"
	case unix.SYS_SELECT:
		return "select"
	}
	return commonName(nr)
}
