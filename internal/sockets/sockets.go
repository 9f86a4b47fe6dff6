// Package sockets makes an app's listening sockets and matches the ones
// systemd passed to the app's [[listen]] entries: Bind and BindSlots bind
// them as the generated .socket unit would (for `cohort run`, which has no
// systemd), Match and MatchSlots order the fds of socket activation by
// their LISTEN_FDNAMES names. It exists apart from the dispatcher because
// none of this touches supervisor state: cmd/cohort prepares the sockets
// and hands them to dispatcher.Run. It is internal because its rules are
// cohort's app file's ([[listen]] names, "<listener>.<slot>"); programs
// receiving sockets use activation.
package sockets

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/activation"
	"github.com/cohort-dev/cohort/appfile"
	"golang.org/x/sys/unix"
)

// ErrMismatch is wrapped by Match when the fds systemd passed do
// not match the app's [[listen]] entries.
var ErrMismatch = errors.New("listening sockets do not match the app file")

// Match orders files (the fds systemd passed, named from
// LISTEN_FDNAMES, as activation.Files.TakeAll returns them) like
// app.Listen, matching them by name. A listener without an fd, or an fd
// without a listener, is an error (wrapping ErrMismatch) that names both
// sides. When no fd has a name at all (each is activation.UnnamedFD, as
// without LISTEN_FDNAMES) and the counts agree, fds are matched by
// position.
//
// The returned files are the same *os.File values; the caller keeps owning
// them (and files that matched nothing) and closes them after Run.
func Match(app *appfile.App, files []*os.File) ([]*os.File, error) {
	unnamed := true
	for _, f := range files {
		if f.Name() != activation.UnnamedFD {
			unnamed = false
		}
	}
	if unnamed && len(files) == len(app.Listen) && len(files) > 0 {
		return append([]*os.File(nil), files...), nil
	}
	var (
		out  = make([]*os.File, len(app.Listen))
		used = make([]bool, len(files))
		errs []string
	)
	passed := make([]string, len(files))
	for i, f := range files {
		passed[i] = fmt.Sprintf("%q (fd %d)", f.Name(), 3+i)
	}
	for i, l := range app.Listen {
		for j, f := range files {
			if !used[j] && f.Name() == l.Name {
				out[i], used[j] = f, true
				break
			}
		}
		if out[i] == nil {
			errs = append(errs, fmt.Sprintf("[[listen]] %q (%s) has no fd from systemd (passed: %s)",
				l.Name, l.Address, listOrNone(passed)))
		}
	}
	for j, f := range files {
		if !used[j] {
			errs = append(errs, fmt.Sprintf("systemd passed fd %d named %q, which matches no [[listen]] (app has: %s)",
				3+j, f.Name(), listenerNames(app)))
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%s: %w: %s", appWhere(app), ErrMismatch, strings.Join(errs, "; "))
	}
	return out, nil
}

// MatchSlots is Match for reuseport mode: systemd passes
// one socket per listener and worker slot, named "<listener>.<slot>"
// (appfile.SlotFDName). It returns them by slot, each slot's in
// app.Listen order. Every slot from 0 up to the highest passed must have
// a socket for every listener; anything else is an error (wrapping
// ErrMismatch) that names what is missing or unknown.
func MatchSlots(app *appfile.App, files []*os.File) ([][]*os.File, error) {
	index := map[string]int{}
	for i, l := range app.Listen {
		index[l.Name] = i
	}
	var (
		slots [][]*os.File
		errs  []string
	)
	for j, f := range files {
		name, slot, ok := appfile.ParseSlotFDName(f.Name())
		k, known := index[name]
		if !ok || !known {
			errs = append(errs, fmt.Sprintf("systemd passed fd %d named %q, which is no <listener>.<worker> of this app (listeners: %s)", 3+j, f.Name(), listenerNames(app)))
			continue
		}
		for len(slots) <= slot {
			slots = append(slots, make([]*os.File, len(app.Listen)))
		}
		if slots[slot][k] != nil {
			errs = append(errs, fmt.Sprintf("systemd passed two fds named %q", f.Name()))
			continue
		}
		slots[slot][k] = f
	}
	for i, set := range slots {
		for k, f := range set {
			if f == nil {
				errs = append(errs, fmt.Sprintf("no fd %q for worker %d of [[listen]] %q (%s)", appfile.SlotFDName(app.Listen[k].Name, i), i, app.Listen[k].Name, app.Listen[k].Address))
			}
		}
	}
	if len(slots) == 0 && len(errs) == 0 {
		errs = append(errs, fmt.Sprintf("no sockets passed (want %s, …)", appfile.SlotFDName(app.Listen[0].Name, 0)))
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%s: %w: %s", appWhere(app), ErrMismatch, strings.Join(errs, "; "))
	}
	return slots, nil
}

func listenerNames(app *appfile.App) string {
	names := make([]string, len(app.Listen))
	for i, l := range app.Listen {
		names[i] = strconv.Quote(l.Name)
	}
	return listOrNone(names)
}

func appWhere(app *appfile.App) string {
	if app.Path == "" {
		return "app " + app.Name
	}
	return app.Path
}

func listOrNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

// Bind creates and binds the app's listening sockets itself, as systemd
// would from the generated .socket unit (`cohort run` uses it in place of
// socket activation). The sockets are blocking, CLOEXEC, in [[listen]]
// order, and named after their listener. The caller owns them: it closes
// them and calls cleanup (which removes the unix socket files Bind
// created) when done. On error nothing is left open.
func Bind(app *appfile.App) (files []*os.File, cleanup func(), err error) {
	var paths []string
	cleanup = func() {
		for _, p := range paths {
			os.Remove(p)
		}
	}
	defer func() {
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			files = nil
			cleanup()
		}
	}()
	for _, l := range app.Listen {
		f, path, err := bindOne(l)
		if err != nil {
			return files, cleanup, fmt.Errorf("listen %q on %s: %w", l.Name, l.Address, err)
		}
		files = append(files, f)
		if path != "" {
			paths = append(paths, path)
		}
	}
	return files, cleanup, nil
}

// BindSlots is Bind for reuseport mode: it binds n sets of the app's
// listeners, all with SO_REUSEPORT, set i before set i+1, as the socket
// units systemd would bind. A listener on port 0 gets the port its first
// socket got in every set. The caller owns the sockets. On error nothing
// is left open.
func BindSlots(app *appfile.App, n int) (slots [][]*os.File, err error) {
	defer func() {
		if err != nil {
			for _, set := range slots {
				for _, f := range set {
					f.Close()
				}
			}
			slots = nil
		}
	}()
	listen := append([]appfile.Listener(nil), app.Listen...)
	for i := range n {
		set := make([]*os.File, 0, len(listen))
		for k := range listen {
			l := &listen[k]
			if l.Kind != appfile.ListenTCP {
				return slots, fmt.Errorf("listen %q on %s: reuseport mode needs TCP listeners", l.Name, l.Address)
			}
			l.ReusePort = true
			f, _, err := bindOne(*l)
			if err != nil {
				for _, f := range set {
					f.Close()
				}
				return slots, fmt.Errorf("listen %q on %s (worker %d): %w", l.Name, l.Address, i, err)
			}
			set = append(set, f)
			if i == 0 {
				// Later sets join this socket's group: same address,
				// same port even when the first bind picked it.
				l.Address = BoundAddr(f)
			}
		}
		slots = append(slots, set)
	}
	return slots, nil
}

// BindMetrics binds app's metrics listener ([metrics] listen) as the
// generated metrics socket unit would, for `cohort run`: nil when the
// app has none. The caller owns the socket and calls cleanup (which
// removes a unix socket file it created) when done. On error nothing is
// left open.
func BindMetrics(app *appfile.App) (f *os.File, cleanup func(), err error) {
	cleanup = func() {}
	if !app.Metrics.On() {
		return nil, cleanup, nil
	}
	l := app.Metrics.Listen
	f, path, err := bindOne(l)
	if err != nil {
		return nil, cleanup, fmt.Errorf("[metrics] listen on %s: %w", l.Address, err)
	}
	if path != "" {
		cleanup = func() { os.Remove(path) }
	}
	return f, cleanup, nil
}

// TakeMetrics takes the metrics listener's socket (named
// appfile.MetricsFDName) out of the fds systemd passed: it returns it
// (nil when there is none) and the others, for Match or MatchSlots.
// A second socket of that name is left among the others, where Match
// refuses it.
func TakeMetrics(files []*os.File) (metrics *os.File, rest []*os.File) {
	for _, f := range files {
		if metrics == nil && f.Name() == appfile.MetricsFDName {
			metrics = f
			continue
		}
		rest = append(rest, f)
	}
	return metrics, rest
}

// BoundAddr is the host:port a TCP socket is bound to (the port that
// ":0" got), or "" for other sockets.
func BoundAddr(f *os.File) string {
	sa, err := unix.Getsockname(int(f.Fd()))
	if err != nil {
		return ""
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	case *unix.SockaddrInet6:
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	}
	return ""
}

// bindOne binds one listener and returns it, with the filesystem path it
// created for a unix socket.
func bindOne(l appfile.Listener) (*os.File, string, error) {
	var (
		sa     unix.Sockaddr
		family int
		path   string
	)
	switch l.Kind {
	case appfile.ListenUnix, appfile.ListenAbstract:
		family = unix.AF_UNIX
		name := l.Address
		if l.Kind == appfile.ListenAbstract {
			name = "\x00" + strings.TrimPrefix(name, "@")
		} else {
			path = name
			if err := removeStaleSocket(path); err != nil {
				return nil, "", err
			}
		}
		sa = &unix.SockaddrUnix{Name: name}
	default:
		addr, err := resolveTCP(l.Address)
		if err != nil {
			return nil, "", err
		}
		if ip4 := addr.IP.To4(); ip4 != nil && addr.IP != nil {
			family = unix.AF_INET
			s := &unix.SockaddrInet4{Port: addr.Port}
			copy(s.Addr[:], ip4)
			sa = s
		} else {
			family = unix.AF_INET6
			s := &unix.SockaddrInet6{Port: addr.Port}
			if addr.IP != nil {
				copy(s.Addr[:], addr.IP.To16())
			}
			sa = s
		}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, "", fmt.Errorf("socket: %w", err)
	}
	fail := func(op string, err error) (*os.File, string, error) {
		unix.Close(fd)
		return nil, "", fmt.Errorf("%s: %w", op, err)
	}
	if family != unix.AF_UNIX {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return fail("setsockopt SO_REUSEADDR", err)
		}
		if family == unix.AF_INET6 {
			// systemd's BindIPv6Only=default: "[::]:port" takes IPv4 too.
			_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
		}
		if l.ReusePort {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
				return fail("setsockopt SO_REUSEPORT", err)
			}
		}
		if l.NoDelay {
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
				return fail("setsockopt TCP_NODELAY", err)
			}
		}
		if l.KeepAlive {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1); err != nil {
				return fail("setsockopt SO_KEEPALIVE", err)
			}
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fail("bind", err)
	}
	if path != "" && l.SocketMode != 0 {
		if err := os.Chmod(path, os.FileMode(l.SocketMode)); err != nil {
			os.Remove(path)
			return fail("chmod", err)
		}
	}
	backlog := l.Backlog
	if backlog <= 0 {
		backlog = unix.SOMAXCONN // systemd's default Backlog=
	}
	if err := unix.Listen(fd, backlog); err != nil {
		if path != "" {
			os.Remove(path)
		}
		return fail("listen", err)
	}
	return os.NewFile(uintptr(fd), l.Name), path, nil
}

// resolveTCP accepts what ListenStream= accepts for TCP ("host:port",
// "[v6]:port", ":port", "port") plus host names such as localhost.
func resolveTCP(addr string) (*net.TCPAddr, error) {
	if _, err := strconv.Atoi(addr); err == nil {
		addr = ":" + addr
	}
	a, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		return nil, err
	}
	return a, nil
}

// removeStaleSocket removes a unix socket file that nobody listens on any
// more, as systemd does before binding. A live socket is an error.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	c, err := net.Dial("unix", path)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s: another process is listening on it", path)
	}
	return os.Remove(path)
}
