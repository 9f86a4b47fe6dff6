package dispatcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// notifyMax is the largest datagram the notify socket accepts; longer ones
// are ignored, as systemd does (its limit is PIPE_BUF).
const notifyMax = 4096

// maxNotifyFDs bounds the fds a notify datagram may carry (the kernel's
// SCM_MAX_FD); the socket closes every one of them.
const maxNotifyFDs = 253

// ErrNotifyMessage is returned by ParseNotification for a datagram that
// systemd itself would reject as a whole.
var ErrNotifyMessage = errors.New("malformed notify message")

// Notification is one sd_notify datagram, parsed. Only the assignments
// cohort acts on are kept; the others are ignored, as systemd ignores
// assignments it does not know.
type Notification struct {
	Ready           bool // READY=1
	Reloading       bool // RELOADING=1
	Stopping        bool // STOPPING=1
	Watchdog        bool // WATCHDOG=1
	WatchdogTrigger bool // WATCHDOG=trigger: the program asks to be treated as hung
	// Status is the STATUS= text when HasStatus; it is valid UTF-8 with
	// control characters replaced by spaces.
	Status    string
	HasStatus bool
	// Errno is ERRNO=, or 0.
	Errno int
}

// ParseNotification parses a notify datagram: newline-separated
// KEY=VALUE assignments, the last one of a key winning. It returns
// ErrNotifyMessage (wrapped) for an empty datagram, one with a NUL byte or
// one longer than 4096 bytes; lines without '=' are skipped, as are values
// it does not understand (READY=0, STATUS= that is not UTF-8).
func ParseNotification(b []byte) (Notification, error) {
	var n Notification
	switch {
	case len(b) == 0:
		return n, fmt.Errorf("%w: empty", ErrNotifyMessage)
	case len(b) > notifyMax:
		return n, fmt.Errorf("%w: %d bytes, more than %d", ErrNotifyMessage, len(b), notifyMax)
	case bytes.IndexByte(b, 0) >= 0:
		return n, fmt.Errorf("%w: embedded NUL", ErrNotifyMessage)
	}
	for line := range bytes.SplitSeq(b, []byte{'\n'}) {
		key, value, ok := bytes.Cut(line, []byte{'='})
		if !ok {
			continue
		}
		switch string(key) {
		case "READY":
			n.Ready = string(value) == "1"
		case "RELOADING":
			n.Reloading = string(value) == "1"
		case "STOPPING":
			n.Stopping = string(value) == "1"
		case "WATCHDOG":
			switch string(value) {
			case "1":
				n.Watchdog = true
			case "trigger":
				n.WatchdogTrigger = true
			}
		case "STATUS":
			if utf8.Valid(value) {
				n.Status, n.HasStatus = cleanStatus(string(value)), true
			}
		case "ERRNO":
			if e, err := strconv.Atoi(string(value)); err == nil && e >= 0 {
				n.Errno = e
			}
		}
	}
	return n, nil
}

// cleanStatus makes a STATUS= value safe for one log or status line.
func cleanStatus(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
}

// notifyMsg is one datagram received on the notify socket, attributed to
// the pid the kernel reported for its sender (0: no credentials).
type notifyMsg struct {
	pid int
	n   Notification
	err error // from ParseNotification, or the datagram was truncated
	fds int   // fds that came along and were closed
}

// notifySocket is the dispatcher's end of its workers' NOTIFY_SOCKET: a
// unixgram socket with SO_PASSCRED. It owns its fd.
type notifySocket struct {
	conn *net.UnixConn
	path string
}

// listenNotify binds a notify socket at path. The caller closes it.
func listenNotify(path string) (*notifySocket, error) {
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	raw, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("notify socket %s: %w", path, err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		conn.Close()
		return nil, fmt.Errorf("setsockopt SO_PASSCRED on %s: %w", path, errors.Join(err, serr))
	}
	return &notifySocket{conn: conn, path: path}, nil
}

// Close closes the socket and removes its path; a serve loop then returns.
func (s *notifySocket) Close() error {
	err := s.conn.Close()
	os.Remove(s.path)
	return err
}

// serve reads datagrams until the socket is closed and hands each one to
// deliver, which returns false when nobody listens any more. Fds that
// come with a datagram are closed before deliver is called.
func (s *notifySocket) serve(ctx context.Context, deliver func(notifyMsg) bool) {
	buf := make([]byte, notifyMax+1)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)+unix.CmsgSpace(4*maxNotifyFDs))
	for ctx.Err() == nil {
		n, oobn, flags, _, err := s.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // e.g. ECONNREFUSED on a unconnected socket never happens; be robust
		}
		m := notifyMsg{}
		m.pid, m.fds = parseNotifyOOB(oob[:oobn])
		if flags&unix.MSG_TRUNC != 0 || n > notifyMax {
			m.err = fmt.Errorf("%w: longer than %d bytes", ErrNotifyMessage, notifyMax)
		} else {
			m.n, m.err = ParseNotification(buf[:n])
		}
		if !deliver(m) {
			return
		}
	}
}

// parseNotifyOOB returns the sender's pid from SCM_CREDENTIALS and closes
// every fd of SCM_RIGHTS, returning how many there were.
func parseNotifyOOB(oob []byte) (pid, fds int) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return 0, 0
	}
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET {
			continue
		}
		switch m.Header.Type {
		case unix.SCM_CREDENTIALS:
			if cred, err := unix.ParseUnixCredentials(&m); err == nil {
				pid = int(cred.Pid)
			}
		case unix.SCM_RIGHTS:
			if rights, err := unix.ParseUnixRights(&m); err == nil {
				for _, fd := range rights {
					unix.Close(fd)
				}
				fds += len(rights)
			}
		}
	}
	return pid, fds
}
