package activation

import (
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

var ready struct {
	mu   sync.Mutex
	sent bool
	auto sync.Once
}

// Ready tells the service manager (systemd, or cohort's dispatcher for a
// worker) that the process is ready: it sends READY=1 to NOTIFY_SOCKET. It
// sends at most once per process: after a successful Ready, later calls and
// the automatic one on the first Accept do nothing. Without NOTIFY_SOCKET
// it does nothing and returns nil; it returns an error when sending fails,
// also when the message cannot be queued within 2 seconds (the manager does
// not read its socket).
func Ready() error {
	ready.mu.Lock()
	defer ready.mu.Unlock()
	if ready.sent {
		return nil
	}
	if err := Notify(daemon.SdNotifyReady); err != nil {
		return err
	}
	ready.sent = true
	return nil
}

// autoReady is called by every Accept: the first call sends READY=1 unless
// Ready already has. A failure is not retried (there is nobody to tell).
func autoReady() {
	ready.auto.Do(func() { _ = Ready() })
}

// Status sends STATUS=s, a one-line message for `systemctl status` and
// `cohort status`; newlines in s become spaces. It returns an error when
// sending fails, nil without NOTIFY_SOCKET.
func Status(s string) error {
	return Notify("STATUS=" + strings.ReplaceAll(s, "\n", " "))
}

// Stopping sends STOPPING=1: the process has begun a graceful shutdown. It
// returns an error when sending fails, nil without NOTIFY_SOCKET.
func Stopping() error {
	return Notify(daemon.SdNotifyStopping)
}

// notifyTimeout bounds sending one message. A datagram to a service
// manager that does not read its socket (its queue is full) would wait for
// room forever, and Accept with it; the message is dropped instead.
const notifyTimeout = 2 * time.Second

// Notify sends state, one or more newline-separated sd_notify(3)
// assignments such as "RELOADING=1\nMONOTONIC_USEC=…", to NOTIFY_SOCKET (a
// path, or @name for an abstract socket). Without NOTIFY_SOCKET it does
// nothing and returns nil. It returns an error when sending fails, also
// when the message cannot be queued within 2 seconds (the manager does not
// read its socket): go-systemd's daemon.SdNotify, which it replaces, has no
// deadline and would block its caller for good. Notify does not count as
// Ready for the automatic READY=1 of the first Accept; use Ready for that.
func Notify(state string) error {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify %s: %w", state, err)
	}
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(notifyTimeout))
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify %s to %s: %w", state, addr, err)
	}
	return nil
}

// readyListener sends READY=1 on the first Accept of the process.
type readyListener struct{ net.Listener }

func (l readyListener) Accept() (net.Conn, error) {
	autoReady()
	return l.Listener.Accept()
}
