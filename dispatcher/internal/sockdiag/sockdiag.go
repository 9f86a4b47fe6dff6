// Package sockdiag asks the kernel how full a listening socket's accept
// queue is, through the sock_diag netlink interface (sock_diag(7)): what
// `ss -lt` and `ss -lx` print as Recv-Q (connections completed and waiting
// for accept) and Send-Q (the backlog that bounds them) for a listener.
//
// It is written on golang.org/x/sys/unix rather than a netlink library:
// it sends two fixed requests and reads two fixed replies, and the
// libraries at hand (vishvananda/netlink) dump every TCP socket of the
// host in every state for one listener, which on a busy server is
// thousands of replies per scrape. Here a TCP request names the state
// (LISTEN only) and the port, so the kernel walks only its listening
// hash and answers for the sockets on that port; a unix request names
// the socket's inode, which the kernel looks up directly.
//
// The sockets are named by Identify, once, from their fds; Queues then
// needs no fd (it runs in a goroutine that owns none). Everything read is
// bounded: the replies to one request by MaxReplies, the whole call by
// its context's deadline (or DefaultTimeout).
package sockdiag

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Socket names one listening socket for Queues.
type Socket struct {
	Family int    // unix.AF_INET, AF_INET6 or AF_UNIX
	Port   uint16 // TCP: the port it is bound to
	Inode  uint64 // the socket's inode (fstat), which tells it apart from others on the port
}

// Queue is a listener's accept queue. Both are -1 when unknown.
type Queue struct {
	Len   int // connections waiting to be accepted
	Limit int // the backlog: the most that may wait
}

// Unknown is the Queue of a socket the kernel did not report.
var Unknown = Queue{Len: -1, Limit: -1}

const (
	// MaxReplies bounds the sockets read in reply to one request: a
	// port has a handful of listeners (one per reuseport worker).
	MaxReplies = 1 << 14
	// DefaultTimeout bounds a Queues call whose context has no deadline.
	DefaultTimeout = time.Second
)

// Identify reads what Queues needs of the listening socket f: its family,
// port and inode. It does not keep f.
func Identify(f *os.File) (Socket, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return Socket{}, fmt.Errorf("sockdiag: %s: %w", f.Name(), err)
	}
	var (
		st   unix.Stat_t
		sa   unix.Sockaddr
		err2 error
	)
	if err := raw.Control(func(fd uintptr) {
		if err2 = unix.Fstat(int(fd), &st); err2 != nil {
			return
		}
		sa, err2 = unix.Getsockname(int(fd))
	}); err != nil {
		return Socket{}, fmt.Errorf("sockdiag: %s: %w", f.Name(), err)
	}
	if err2 != nil {
		return Socket{}, fmt.Errorf("sockdiag: %s: %w", f.Name(), err2)
	}
	s := Socket{Inode: st.Ino}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		s.Family, s.Port = unix.AF_INET, uint16(a.Port)
	case *unix.SockaddrInet6:
		s.Family, s.Port = unix.AF_INET6, uint16(a.Port)
	case *unix.SockaddrUnix:
		s.Family = unix.AF_UNIX
	default:
		return Socket{}, fmt.Errorf("sockdiag: %s: not an inet or unix socket", f.Name())
	}
	return s, nil
}

// Queues returns the accept queue of each socket, Unknown for one the
// kernel did not report (closed meanwhile, or in another network
// namespace). The error says why some are Unknown; the queues are
// returned all the same.
func Queues(ctx context.Context, socks []Socket) ([]Queue, error) {
	out := make([]Queue, len(socks))
	for i := range out {
		out[i] = Unknown
	}
	if len(socks) == 0 {
		return out, nil
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(DefaultTimeout)
	}
	c, err := dial(deadline)
	if err != nil {
		return out, err
	}
	defer c.close()
	var errs []error
	// TCP: one request per (family, port), every socket on it matched by
	// inode.
	type portKey struct {
		family int
		port   uint16
	}
	asked := map[portKey]bool{}
	for _, s := range socks {
		k := portKey{s.Family, s.Port}
		if s.Family == unix.AF_UNIX || asked[k] {
			continue
		}
		asked[k] = true
		got, err := c.inet(s.Family, s.Port)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for i, t := range socks {
			if q, ok := got[t.Inode]; ok && t.Family == s.Family && t.Port == s.Port {
				out[i] = q
			}
		}
	}
	for i, s := range socks {
		if s.Family != unix.AF_UNIX {
			continue
		}
		q, err := c.unix(s.Inode)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out[i] = q
	}
	return out, errors.Join(errs...)
}

// conn is a NETLINK_SOCK_DIAG socket.
type conn struct {
	fd  int
	seq uint32
	buf []byte
}

func dial(deadline time.Time) (*conn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sockdiag: netlink socket: %w", err)
	}
	// A blocking socket with a receive timeout: the kernel answers at
	// once, and a stuck answer ends at the deadline.
	tv := unix.NsecToTimeval(max(time.Until(deadline), time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sockdiag: SO_RCVTIMEO: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sockdiag: bind: %w", err)
	}
	return &conn{fd: fd, buf: make([]byte, 32<<10)}, nil
}

func (c *conn) close() { unix.Close(c.fd) }

// Sizes and constants of linux/inet_diag.h and linux/unix_diag.h that
// x/sys/unix does not carry.
const (
	sizeofInetDiagReqV2 = 56
	sizeofInetDiagMsg   = 72
	sizeofUnixDiagReq   = 24
	sizeofUnixDiagMsg   = 16
	tcpListen           = 10 // TCP_LISTEN
	udiagShowRQLen      = 0x10
	unixDiagRQLen       = 4
	sizeofRtAttr        = 4
)

// inet asks for the listening TCP sockets of family on port and returns
// their queues by inode.
func (c *conn) inet(family int, port uint16) (map[uint64]Queue, error) {
	req := make([]byte, sizeofInetDiagReqV2)
	req[0] = byte(family)
	req[1] = unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(req[4:], 1<<tcpListen)
	binary.BigEndian.PutUint16(req[8:], port) // id.idiag_sport, network order
	// id.idiag_cookie: INET_DIAG_NOCOOKIE
	binary.NativeEndian.PutUint32(req[48:], ^uint32(0))
	binary.NativeEndian.PutUint32(req[52:], ^uint32(0))
	got := map[uint64]Queue{}
	err := c.request(req, unix.NLM_F_DUMP, func(msg []byte) error {
		m, err := ParseInetDiagMsg(msg)
		if err != nil {
			return err
		}
		if m.Port == port && int(m.Family) == family && m.State == tcpListen {
			got[uint64(m.Inode)] = Queue{Len: int(m.RQueue), Limit: int(m.WQueue)}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("sockdiag: %s port %d: %w", familyName(family), port, err)
	}
	return got, nil
}

// unix asks for the unix socket with inode ino.
func (c *conn) unix(ino uint64) (Queue, error) {
	if ino > 1<<32-1 {
		return Unknown, fmt.Errorf("sockdiag: unix socket inode %d does not fit the request", ino)
	}
	req := make([]byte, sizeofUnixDiagReq)
	req[0] = unix.AF_UNIX
	binary.NativeEndian.PutUint32(req[4:], 1<<tcpListen)
	binary.NativeEndian.PutUint32(req[8:], uint32(ino))
	binary.NativeEndian.PutUint32(req[12:], udiagShowRQLen)
	binary.NativeEndian.PutUint32(req[16:], ^uint32(0))
	binary.NativeEndian.PutUint32(req[20:], ^uint32(0))
	q := Unknown
	err := c.request(req, 0, func(msg []byte) error {
		m, err := ParseUnixDiagMsg(msg)
		if err != nil {
			return err
		}
		if uint64(m.Inode) == ino && m.HasRQLen {
			q = Queue{Len: int(m.RQueue), Limit: int(m.WQueue)}
		}
		return nil
	})
	if err != nil {
		return Unknown, fmt.Errorf("sockdiag: unix socket inode %d: %w", ino, err)
	}
	return q, nil
}

// request sends one SOCK_DIAG_BY_FAMILY request and calls each with the
// payload of every reply until the kernel is done (a dump's NLMSG_DONE,
// or the one answer of an exact request).
func (c *conn) request(body []byte, flags uint16, each func([]byte) error) error {
	c.seq++
	msg := make([]byte, unix.NLMSG_HDRLEN+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|flags)
	binary.NativeEndian.PutUint32(msg[8:], c.seq)
	copy(msg[unix.NLMSG_HDRLEN:], body)
	if err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	replies := 0
	for {
		n, from, err := unix.Recvfrom(c.fd, c.buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) {
				return errors.New("no answer before the deadline")
			}
			return fmt.Errorf("receive: %w", err)
		}
		if nl, ok := from.(*unix.SockaddrNetlink); !ok || nl.Pid != 0 {
			continue // not from the kernel
		}
		done, err := walk(c.buf[:n], c.seq, flags&unix.NLM_F_DUMP == 0, func(payload []byte) error {
			if replies++; replies > MaxReplies {
				return fmt.Errorf("more than %d replies", MaxReplies)
			}
			return each(payload)
		})
		if err != nil || done {
			return err
		}
	}
}

// walk goes through the netlink messages in b that answer seq, calling
// each with every data message's payload. done is true at NLMSG_DONE,
// and after the first data message when single (an exact request's one
// answer). An NLMSG_ERROR with an errno is returned as that errno
// (ENOENT: no such socket).
func walk(b []byte, seq uint32, single bool, each func([]byte) error) (done bool, err error) {
	for len(b) >= unix.NLMSG_HDRLEN {
		l := binary.NativeEndian.Uint32(b[0:])
		typ := binary.NativeEndian.Uint16(b[4:])
		s := binary.NativeEndian.Uint32(b[8:])
		if l < unix.NLMSG_HDRLEN || int(l) > len(b) {
			return true, errors.New("malformed netlink message")
		}
		payload := b[unix.NLMSG_HDRLEN:l]
		next := min(int(l+3)&^3, len(b))
		b = b[next:]
		if s != seq {
			continue // a late answer to an earlier request
		}
		switch typ {
		case unix.NLMSG_DONE:
			return true, nil
		case unix.NLMSG_ERROR:
			if len(payload) < 4 {
				return true, errors.New("malformed netlink error")
			}
			errno := -int32(binary.NativeEndian.Uint32(payload))
			if errno == 0 {
				return true, nil // an acknowledgement
			}
			return true, unix.Errno(errno)
		case unix.NLMSG_NOOP:
			continue
		}
		if err := each(payload); err != nil {
			return true, err
		}
		if single {
			return true, nil
		}
	}
	return false, nil
}

// InetDiagMsg is the part of struct inet_diag_msg that Queues reads.
type InetDiagMsg struct {
	Family, State  uint8
	Port           uint16 // idiag_sport, host order
	RQueue, WQueue uint32
	Inode          uint32
}

// ParseInetDiagMsg decodes an inet_diag_msg (the rtattrs that may follow
// are ignored).
func ParseInetDiagMsg(b []byte) (InetDiagMsg, error) {
	if len(b) < sizeofInetDiagMsg {
		return InetDiagMsg{}, fmt.Errorf("inet_diag_msg of %d bytes, want %d", len(b), sizeofInetDiagMsg)
	}
	return InetDiagMsg{
		Family: b[0],
		State:  b[1],
		Port:   binary.BigEndian.Uint16(b[4:]),
		RQueue: binary.NativeEndian.Uint32(b[56:]),
		WQueue: binary.NativeEndian.Uint32(b[60:]),
		Inode:  binary.NativeEndian.Uint32(b[68:]),
	}, nil
}

// UnixDiagMsg is the part of a unix_diag_msg and its UNIX_DIAG_RQLEN
// attribute that Queues reads.
type UnixDiagMsg struct {
	State          uint8
	Inode          uint32
	HasRQLen       bool
	RQueue, WQueue uint32
}

// ParseUnixDiagMsg decodes a unix_diag_msg and its attributes.
func ParseUnixDiagMsg(b []byte) (UnixDiagMsg, error) {
	if len(b) < sizeofUnixDiagMsg {
		return UnixDiagMsg{}, fmt.Errorf("unix_diag_msg of %d bytes, want %d", len(b), sizeofUnixDiagMsg)
	}
	m := UnixDiagMsg{State: b[2], Inode: binary.NativeEndian.Uint32(b[4:])}
	attrs := b[sizeofUnixDiagMsg:]
	for len(attrs) >= sizeofRtAttr {
		l := int(binary.NativeEndian.Uint16(attrs[0:]))
		typ := binary.NativeEndian.Uint16(attrs[2:])
		if l < sizeofRtAttr || l > len(attrs) {
			return m, errors.New("malformed unix_diag attribute")
		}
		if typ == unixDiagRQLen && l >= sizeofRtAttr+8 {
			m.HasRQLen = true
			m.RQueue = binary.NativeEndian.Uint32(attrs[4:])
			m.WQueue = binary.NativeEndian.Uint32(attrs[8:])
		}
		attrs = attrs[min((l+3)&^3, len(attrs)):]
	}
	return m, nil
}

func familyName(f int) string {
	switch f {
	case unix.AF_INET:
		return "tcp"
	case unix.AF_INET6:
		return "tcp6"
	}
	return fmt.Sprintf("family %d", f)
}
