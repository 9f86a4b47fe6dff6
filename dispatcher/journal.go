package dispatcher

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// DefaultJournalSocket is journald's native-protocol socket.
const DefaultJournalSocket = "/run/systemd/journal/socket"

// journalSender writes entries to journald's native protocol
// (systemd.journal-fields(7), "Native Journal Protocol"): one datagram per
// entry on an unconnected unixgram socket; an entry too big for a
// datagram goes as a sealed memfd passed with SCM_RIGHTS, as libsystemd's
// sd_journal_send does. It is safe for concurrent use: each entry is one
// sendmsg.
type journalSender struct {
	path string
	once sync.Once
	fd   int
	err  error
}

// journalField is one FIELD=value of an entry.
type journalField struct {
	key   string
	value []byte
}

func newJournalSender(path string) *journalSender {
	if path == "" {
		path = DefaultJournalSocket
	}
	return &journalSender{path: path, fd: -1}
}

// send writes one entry. It fails when the socket cannot be reached.
func (j *journalSender) send(fields []journalField) error {
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
		b.WriteString(f.key)
		if bytes.IndexByte(f.value, '\n') < 0 {
			b.WriteByte('=')
			b.Write(f.value)
		} else { // binary-safe form: KEY\n, little-endian length, value
			b.WriteByte('\n')
			binary.Write(&b, binary.LittleEndian, uint64(len(f.value)))
			b.Write(f.value)
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
func (j *journalSender) sendMemfd(entry []byte, to *unix.SockaddrUnix) error {
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

// close releases the socket.
func (j *journalSender) close() {
	if j.fd >= 0 {
		unix.Close(j.fd)
		j.fd = -1
	}
}
