package notify

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Message
		err  bool
	}{
		{in: "READY=1", want: Message{Ready: true}},
		{in: "READY=1\nSTATUS=serving 4 conns\n", want: Message{Ready: true, Status: "serving 4 conns", HasStatus: true}},
		{in: "WATCHDOG=1", want: Message{Watchdog: true}},
		{in: "WATCHDOG=trigger", want: Message{WatchdogTrigger: true}},
		{in: "STOPPING=1\nERRNO=2", want: Message{Stopping: true, Errno: 2}},
		{in: "RELOADING=1\nMONOTONIC_USEC=123", want: Message{Reloading: true}},
		{in: "READY=0", want: Message{}},
		{in: "STATUS=a\tb\rc", want: Message{Status: "a b c", HasStatus: true}},
		{in: "STATUS=\xff\xfe", want: Message{}},
		{in: "STATUS=first\nSTATUS=last", want: Message{Status: "last", HasStatus: true}},
		{in: "garbage\nREADY=1\n=\nFDSTORE=1", want: Message{Ready: true}},
		{in: "", err: true},
		{in: "READY=1\x00", err: true},
		{in: "STATUS=" + strings.Repeat("x", 5000), err: true},
	} {
		got, err := Parse([]byte(tc.in))
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v, error %v", tc.in, got, err, tc.want, tc.err)
		}
		if err != nil && !errors.Is(err, ErrMalformed) {
			t.Errorf("Parse(%q): error %v is not ErrMalformed", tc.in, err)
		}
	}
}

// FuzzParse: the parser never panics, accepts every datagram
// systemd would (short, no NUL), and yields a status that is one valid
// UTF-8 line.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"READY=1", "READY=1\nSTATUS=ok", "WATCHDOG=trigger", "STOPPING=1\nERRNO=-1", "STATUS=\xff"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := Parse(b)
		valid := len(b) > 0 && len(b) <= maxDatagram && !strings.ContainsRune(string(b), 0)
		if valid != (err == nil) {
			t.Fatalf("Parse(%q) error %v, want error: %v", b, err, !valid)
		}
		if !utf8.ValidString(n.Status) || strings.ContainsAny(n.Status, "\n\r\x00") {
			t.Fatalf("status %q is not one clean line", n.Status)
		}
		if n.Errno < 0 {
			t.Fatalf("negative errno %d", n.Errno)
		}
		if n.Ready != strings.Contains("\n"+string(b)+"\n", "\nREADY=1\n") && err == nil {
			// READY= may be overridden by a later READY=0.
			if !strings.Contains(string(b), "READY=") {
				t.Fatalf("Ready=%v for %q", n.Ready, b)
			}
		}
	})
}

// TestServe: a datagram on the real socket is attributed to the sender's
// pid as the kernel reports it, the fds sent along are closed and
// counted, and a malformed one arrives with ErrMalformed; Close ends Serve.
func TestServe(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify")
	s, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan Datagram, 4)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Serve(context.Background(), func(d Datagram) bool { got <- d; return true })
	}()
	defer func() {
		s.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after Close")
		}
	}()

	c, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(c)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	to := &unix.SockaddrUnix{Name: path}
	if err := unix.Sendmsg(c, []byte("READY=1\nSTATUS=up"), unix.UnixRights(int(w.Fd())), to, 0); err != nil {
		t.Fatal(err)
	}
	w.Close() // the socket now holds the only other copy of the write end
	if err := unix.Sendmsg(c, []byte("READY=1\x00"), nil, to, 0); err != nil {
		t.Fatal(err)
	}
	recv := func() Datagram {
		select {
		case d := <-got:
			return d
		case <-time.After(10 * time.Second):
			t.Fatal("no datagram delivered")
		}
		return Datagram{}
	}
	d := recv()
	if d.PID != os.Getpid() || d.FDs != 1 || d.Err != nil || d.Msg != (Message{Ready: true, Status: "up", HasStatus: true}) {
		t.Errorf("first datagram = %+v, want pid %d, 1 fd, READY and STATUS", d, os.Getpid())
	}
	// The passed write end was closed by Serve: the pipe reads EOF.
	r.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := r.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Errorf("read from the pipe whose write end was sent = %d, %v; want EOF (fd closed)", n, err)
	}
	if d := recv(); !errors.Is(d.Err, ErrMalformed) || d.PID != os.Getpid() {
		t.Errorf("second datagram = %+v, want ErrMalformed from pid %d", d, os.Getpid())
	}
}
