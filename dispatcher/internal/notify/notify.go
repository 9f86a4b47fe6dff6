// Package notify is the server side of sd_notify(3) for the dispatcher's
// workers: a unixgram socket with SO_PASSCRED that attributes each
// datagram to the pid the kernel vouches for, closes any fds sent along,
// and parses the assignments cohort acts on. It exists apart from the
// dispatcher because it never touches supervisor state: it only turns
// datagrams into values, which the dispatcher's loop acts on.
// (activation.Notify is the client side.)
package notify

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

// maxDatagram is the largest datagram the notify socket accepts; longer ones
// are ignored, as systemd does (its limit is PIPE_BUF).
const maxDatagram = 4096

// maxFDs bounds the fds a notify datagram may carry (the kernel's
// SCM_MAX_FD); the socket closes every one of them.
const maxFDs = 253

// ErrMalformed is returned by Parse for a datagram that
// systemd itself would reject as a whole.
var ErrMalformed = errors.New("malformed notify message")

// Message is one sd_notify datagram, parsed. Only the assignments
// cohort acts on are kept; the others are ignored, as systemd ignores
// assignments it does not know.
type Message struct {
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

// Parse parses a notify datagram: newline-separated
// KEY=VALUE assignments, the last one of a key winning. It returns
// ErrMalformed (wrapped) for an empty datagram, one with a NUL byte or
// one longer than 4096 bytes; lines without '=' are skipped, as are values
// it does not understand (READY=0, STATUS= that is not UTF-8).
func Parse(b []byte) (Message, error) {
	var n Message
	switch {
	case len(b) == 0:
		return n, fmt.Errorf("%w: empty", ErrMalformed)
	case len(b) > maxDatagram:
		return n, fmt.Errorf("%w: %d bytes, more than %d", ErrMalformed, len(b), maxDatagram)
	case bytes.IndexByte(b, 0) >= 0:
		return n, fmt.Errorf("%w: embedded NUL", ErrMalformed)
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

// Datagram is one datagram received on the notify socket, attributed to
// the pid the kernel reported for its sender (0: no credentials).
type Datagram struct {
	PID int
	Msg Message
	Err error // from Parse, or the datagram was truncated
	FDs int   // fds that came along and were closed
}

// Socket is the dispatcher's end of its workers' NOTIFY_SOCKET: a
// unixgram socket with SO_PASSCRED. It owns its fd.
type Socket struct {
	conn *net.UnixConn
	path string
}

// Listen binds a notify socket at path. The caller closes it.
func Listen(path string) (*Socket, error) {
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
	return &Socket{conn: conn, path: path}, nil
}

// Close closes the socket and removes its path; Serve then returns.
func (s *Socket) Close() error {
	err := s.conn.Close()
	os.Remove(s.path)
	return err
}

// Serve reads datagrams until the socket is closed or ctx is done (checked
// between datagrams: Close is what ends a blocked read) and hands each one
// to deliver, which returns false when nobody listens any more. Fds that
// come with a datagram are closed before deliver is called.
func (s *Socket) Serve(ctx context.Context, deliver func(Datagram) bool) {
	buf := make([]byte, maxDatagram+1)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)+unix.CmsgSpace(4*maxFDs))
	for ctx.Err() == nil {
		n, oobn, flags, _, err := s.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // e.g. ECONNREFUSED on a unconnected socket never happens; be robust
		}
		m := Datagram{}
		m.PID, m.FDs = parseOOB(oob[:oobn])
		if flags&unix.MSG_TRUNC != 0 || n > maxDatagram {
			m.Err = fmt.Errorf("%w: longer than %d bytes", ErrMalformed, maxDatagram)
		} else {
			m.Msg, m.Err = Parse(buf[:n])
		}
		if !deliver(m) {
			return
		}
	}
}

// parseOOB returns the sender's pid from SCM_CREDENTIALS and closes
// every fd of SCM_RIGHTS, returning how many there were.
func parseOOB(oob []byte) (pid, fds int) {
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
