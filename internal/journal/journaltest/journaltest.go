// Package journaltest is a fake journald for tests: a real datagram socket
// that decodes the native protocol as journald does, memfds included, so
// that a test can point a journal.Sender (or a dispatcher) at it and read
// back the entries.
package journaltest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// Journald is a fake journald listening at Path. Entries receives each
// decoded entry (up to 4096 queued; more are dropped). It is closed, and
// its reader waited for, when the test ends.
type Journald struct {
	Path    string
	Entries chan map[string]string
	conn    *net.UnixConn
	done    chan struct{}
}

// Start starts a fake journald in a temporary directory of t. A datagram
// it cannot decode, or a memfd that was not sealed, fails t.
func Start(t testing.TB) *Journald {
	t.Helper()
	path := filepath.Join(t.TempDir(), "journal.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadBuffer(4 << 20)
	j := &Journald{Path: path, Entries: make(chan map[string]string, 4096), conn: conn, done: make(chan struct{})}
	go func() {
		defer close(j.done)
		buf := make([]byte, 1<<20)
		oob := make([]byte, unix.CmsgSpace(4))
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			data := append([]byte(nil), buf[:n]...)
			if oobn > 0 {
				data, err = readMemfd(oob[:oobn])
				if err != nil {
					t.Errorf("fake journald: %v", err)
					continue
				}
			}
			e, err := parseNative(data)
			if err == nil && len(e) == 0 {
				err = errors.New("empty entry")
			}
			if err != nil {
				t.Errorf("fake journald: %v", err)
				continue
			}
			select {
			case j.Entries <- e:
			default:
			}
		}
	}()
	t.Cleanup(func() { conn.Close(); <-j.done })
	return j
}

// readMemfd reads the entry of a memfd passed with SCM_RIGHTS, checking
// that it was sealed as journald requires.
func readMemfd(oob []byte) ([]byte, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil || len(msgs) != 1 {
		return nil, errors.New("bad control message")
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return nil, errors.New("bad SCM_RIGHTS")
	}
	f := os.NewFile(uintptr(fds[0]), "memfd")
	defer f.Close()
	seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
	if err != nil || seals&unix.F_SEAL_WRITE == 0 {
		return nil, errors.New("memfd not sealed")
	}
	// The sender's writes left the shared offset at the end: read from 0,
	// as journald (which maps the file) does.
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return nil, err
	}
	return b, nil
}

// parseNative decodes one native-protocol entry.
func parseNative(b []byte) (map[string]string, error) {
	e := map[string]string{}
	for len(b) > 0 {
		nl := bytes.IndexByte(b, '\n')
		if nl < 0 {
			return nil, errors.New("field without newline")
		}
		line := b[:nl]
		if k, v, ok := bytes.Cut(line, []byte{'='}); ok {
			e[string(k)] = string(v)
			b = b[nl+1:]
			continue
		}
		rest := b[nl+1:]
		if len(rest) < 8 {
			return nil, errors.New("short binary field")
		}
		n := binary.LittleEndian.Uint64(rest)
		if uint64(len(rest)-8) < n+1 || rest[8+n] != '\n' {
			return nil, errors.New("bad binary field length")
		}
		e[string(line)] = string(rest[8 : 8+n])
		b = rest[9+n:]
	}
	return e, nil
}
