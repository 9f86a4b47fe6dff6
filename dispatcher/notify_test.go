package dispatcher

import (
	"errors"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestParseNotification(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Notification
		err  bool
	}{
		{in: "READY=1", want: Notification{Ready: true}},
		{in: "READY=1\nSTATUS=serving 4 conns\n", want: Notification{Ready: true, Status: "serving 4 conns", HasStatus: true}},
		{in: "WATCHDOG=1", want: Notification{Watchdog: true}},
		{in: "WATCHDOG=trigger", want: Notification{WatchdogTrigger: true}},
		{in: "STOPPING=1\nERRNO=2", want: Notification{Stopping: true, Errno: 2}},
		{in: "RELOADING=1\nMONOTONIC_USEC=123", want: Notification{Reloading: true}},
		{in: "READY=0", want: Notification{}},
		{in: "STATUS=a\tb\rc", want: Notification{Status: "a b c", HasStatus: true}},
		{in: "STATUS=\xff\xfe", want: Notification{}},
		{in: "STATUS=first\nSTATUS=last", want: Notification{Status: "last", HasStatus: true}},
		{in: "garbage\nREADY=1\n=\nFDSTORE=1", want: Notification{Ready: true}},
		{in: "", err: true},
		{in: "READY=1\x00", err: true},
		{in: "STATUS=" + strings.Repeat("x", 5000), err: true},
	} {
		got, err := ParseNotification([]byte(tc.in))
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseNotification(%q) = %+v, %v; want %+v, error %v", tc.in, got, err, tc.want, tc.err)
		}
		if err != nil && !errors.Is(err, ErrNotifyMessage) {
			t.Errorf("ParseNotification(%q): error %v is not ErrNotifyMessage", tc.in, err)
		}
	}
}

// FuzzParseNotification: the parser never panics, accepts every datagram
// systemd would (short, no NUL), and yields a status that is one valid
// UTF-8 line.
func FuzzParseNotification(f *testing.F) {
	for _, s := range []string{"READY=1", "READY=1\nSTATUS=ok", "WATCHDOG=trigger", "STOPPING=1\nERRNO=-1", "STATUS=\xff"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := ParseNotification(b)
		valid := len(b) > 0 && len(b) <= notifyMax && !strings.ContainsRune(string(b), 0)
		if valid != (err == nil) {
			t.Fatalf("ParseNotification(%q) error %v, want error: %v", b, err, !valid)
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
