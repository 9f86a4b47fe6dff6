// Package journal is cohort's one writer of journald's native protocol
// (systemd.journal-fields(7), "Native Journal Protocol"), used by the
// dispatcher for worker lines and by the generator for its report lines.
//
// It is cohort's own rather than go-systemd's journal.Send, which also
// speaks the protocol (memfd included) without cgo, because the
// dispatcher sends one entry per worker line: Send takes a map of strings
// per entry and keeps its socket in package state, whereas a Sender takes
// fields as byte slices a caller can reuse from line to line, and is told
// its socket path, so that tests point it at a fake journald
// (journaltest) instead of the machine's.
package journal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// DefaultSocket is journald's native-protocol socket.
const DefaultSocket = "/run/systemd/journal/socket"

// Priority is an entry's PRIORITY=, a syslog level.
type Priority int

// The syslog levels, as in syslog(3).
const (
	PriEmerg Priority = iota
	PriAlert
	PriCrit
	PriErr
	PriWarning
	PriNotice
	PriInfo
	PriDebug
)

// Field is one FIELD=value of an entry. Value may hold any bytes,
// newlines included (they are sent in the protocol's binary-safe form).
type Field struct {
	Key   string
	Value []byte
}

// Sender writes entries to journald: one datagram per entry on an
// unconnected unixgram socket; an entry too big for a datagram goes as a
// sealed memfd passed with SCM_RIGHTS, as libsystemd's sd_journal_send
// does. It is safe for concurrent use: each entry is one sendmsg. The
// socket is made on the first Send; Close releases it.
type Sender struct {
	path string
	once sync.Once
	fd   int
	err  error
}

// NewSender returns a Sender to the socket at path ("" is DefaultSocket).
// It opens nothing yet.
func NewSender(path string) *Sender {
	if path == "" {
		path = DefaultSocket
	}
	return &Sender{path: path, fd: -1}
}

// Send writes one entry. It fails when the socket cannot be made or
// journald cannot be reached (no socket at the path, or its queue is full
// and the memfd could not be sent either); the entry is then not sent.
func (j *Sender) Send(fields []Field) error {
	j.once.Do(func() {
		j.fd, j.err = unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if j.err != nil {
			j.err = fmt.Errorf("journal socket: %w", j.err)
		}
	})
	if j.err != nil {
		return j.err
	}
	var b bytes.Buffer
	for _, f := range fields {
		b.WriteString(f.Key)
		if bytes.IndexByte(f.Value, '\n') < 0 {
			b.WriteByte('=')
			b.Write(f.Value)
		} else { // binary-safe form: KEY\n, little-endian length, value
			b.WriteByte('\n')
			binary.Write(&b, binary.LittleEndian, uint64(len(f.Value)))
			b.Write(f.Value)
		}
		b.WriteByte('\n')
	}
	to := &unix.SockaddrUnix{Name: j.path}
	err := unix.Sendmsg(j.fd, b.Bytes(), nil, to, 0)
	if errors.Is(err, unix.EMSGSIZE) || errors.Is(err, unix.ENOBUFS) {
		err = j.sendMemfd(b.Bytes(), to)
	}
	if err != nil {
		return fmt.Errorf("send to journal %s: %w", j.path, err)
	}
	return nil
}

// sendMemfd passes a big entry as a sealed memfd.
func (j *Sender) sendMemfd(entry []byte, to *unix.SockaddrUnix) error {
	fd, err := unix.MemfdCreate("cohort-journal", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return fmt.Errorf("memfd_create: %w", err)
	}
	defer unix.Close(fd)
	for b := entry; len(b) > 0; {
		n, err := unix.Write(fd, b)
		if err != nil {
			return fmt.Errorf("write memfd: %w", err)
		}
		b = b[n:]
	}
	seals := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE | unix.F_SEAL_SEAL
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
		return fmt.Errorf("seal memfd: %w", err)
	}
	return unix.Sendmsg(j.fd, nil, unix.UnixRights(fd), to, 0)
}

// Close releases the socket. The Sender must not be used afterwards.
func (j *Sender) Close() {
	if j.fd >= 0 {
		unix.Close(j.fd)
		j.fd = -1
	}
}
