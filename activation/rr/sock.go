package rr

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sock is one end of a channel (the dispatcher's or a worker's), kept out
// of Go's netpoller.
//
// The netpoller watches every fd it holds for reading and for writing,
// edge-triggered, whether or not a goroutine waits on it: with the
// channel there, each ACK and each message the worker read woke a
// runtime thread of the dispatcher for nothing, two thread wake-ups per
// connection beyond the event loop's own (issue 19's profile: the
// runtime's epoll_wait returned with a channel's EPOLLIN|EPOLLOUT as often
// as the event loop woke). The balancer's event loops watch channels in
// their own epoll sets and send and receive with MSG_DONTWAIT; what waits
// (Send, Recv, WaitWritable: tests, and a writer after the worker's queue
// was full) waits in poll(2), in a goroutine of its own.
type sock struct {
	f      *os.File // blocking in os's eyes, so never in the netpoller; O_NONBLOCK in the kernel's
	rc     syscall.RawConn
	closed atomic.Bool

	// kick is an eventfd that SetReadDeadline makes readable, so that a
	// Recv waiting in poll(2) notices the new deadline; only Recv reads it.
	kick   *os.File
	kickRC syscall.RawConn

	mu       sync.Mutex
	deadline time.Time // Recv's; zero: none
}

// newSock takes fd, a connected unix socket, and kicks Recv with a new
// eventfd. On error fd is closed.
func newSock(fd int, name string) (*sock, error) {
	// os.NewFile sees a blocking fd and keeps it out of the netpoller;
	// only then is it made non-blocking, so that no call can block on it
	// by accident (poll(2) is the only wait).
	f := os.NewFile(uintptr(fd), name)
	if err := unix.SetNonblock(fd, true); err != nil {
		f.Close()
		return nil, fmt.Errorf("round-robin channel: set non-blocking: %w", err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("round-robin channel: %w", err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("round-robin channel: eventfd: %w", err)
	}
	kick := os.NewFile(uintptr(efd), "cohort-rr-kick")
	kickRC, err := kick.SyscallConn()
	if err != nil {
		f.Close()
		kick.Close()
		return nil, fmt.Errorf("round-robin channel: %w", err)
	}
	return &sock{f: f, rc: rc, kick: kick, kickRC: kickRC}, nil
}

// closedErr turns the error of a call on a closed sock into net.ErrClosed,
// which is what callers test for (os would say "use of closed file").
func (s *sock) closedErr(err error) error {
	if err != nil && s.closed.Load() {
		return net.ErrClosed
	}
	return err
}

// control calls f with the socket's fd, which stays open meanwhile.
func (s *sock) control(f func(fd int)) error {
	if s.closed.Load() {
		return net.ErrClosed
	}
	return s.closedErr(s.rc.Control(func(u uintptr) { f(int(u)) }))
}

// trySend is sendmsg(2) of b with fds, without waiting for room (an error
// wrapping unix.EAGAIN when there is none).
func (s *sock) trySend(b []byte, fds []int) error {
	if s.closed.Load() {
		return fmt.Errorf("sendmsg: %w", net.ErrClosed)
	}
	return s.closedErr(trySendMsg(s.rc, b, fds))
}

// send is trySend that waits while the worker's queue is full.
func (s *sock) send(b []byte, fds []int) error {
	for {
		err := s.trySend(b, fds)
		if !errors.Is(err, unix.EAGAIN) {
			return err
		}
		if err := s.wait(unix.POLLOUT, false); err != nil {
			return fmt.Errorf("sendmsg: %w", err)
		}
	}
}

// tryRecv is one recvmsg(2) without waiting (recvResult's result, or an
// error that is unix.EAGAIN itself when nothing is queued).
func (s *sock) tryRecv(b, oob []byte) ([]byte, []int, error) {
	if s.closed.Load() {
		return nil, nil, fmt.Errorf("recvmsg: %w", net.ErrClosed)
	}
	got, fds, err := tryRecvMsg(s.rc, b, oob)
	if err == unix.EAGAIN {
		return nil, nil, err
	}
	return got, fds, s.closedErr(err)
}

// recv is tryRecv that waits for a message, up to the read deadline.
func (s *sock) recv(b, oob []byte) ([]byte, []int, error) {
	for {
		got, fds, err := s.tryRecv(b, oob)
		if err != unix.EAGAIN {
			return got, fds, err
		}
		if err := s.wait(unix.POLLIN, true); err != nil {
			return nil, nil, fmt.Errorf("recvmsg: %w", err)
		}
	}
}

// tryRecvBatch is in.tryRead on the socket.
func (s *sock) tryRecvBatch(in *inbox) error {
	if s.closed.Load() {
		return fmt.Errorf("recvmmsg: %w", net.ErrClosed)
	}
	err := in.tryRead(s.rc)
	if err == unix.EAGAIN {
		return err
	}
	return s.closedErr(err)
}

// recvBatch is tryRecvBatch that waits for a message, up to the read
// deadline.
func (s *sock) recvBatch(in *inbox) error {
	for {
		err := s.tryRecvBatch(in)
		if err != unix.EAGAIN {
			return err
		}
		if err := s.wait(unix.POLLIN, true); err != nil {
			return fmt.Errorf("recvmmsg: %w", err)
		}
	}
}

// wait blocks in poll(2) until the socket reports one of events (or an
// error or hang-up), the sock is closed, or, with reading, the read
// deadline passes (os.ErrDeadlineExceeded) or moves (wait looks again).
func (s *sock) wait(events int16, reading bool) error {
	for {
		timeout := -1
		if reading {
			s.mu.Lock()
			d := s.deadline
			s.mu.Unlock()
			if !d.IsZero() {
				left := time.Until(d)
				if left <= 0 {
					return os.ErrDeadlineExceeded
				}
				timeout = int((left + time.Millisecond - 1) / time.Millisecond)
			}
		}
		pfds := []unix.PollFd{{Events: events}, {Fd: -1}} // a negative fd is ignored
		var perr error
		err := s.control(func(fd int) {
			pfds[0].Fd = int32(fd)
			if !reading {
				_, perr = unix.Poll(pfds[:1], timeout)
				return
			}
			kerr := s.kickControl(func(kfd int) {
				pfds[1] = unix.PollFd{Fd: int32(kfd), Events: unix.POLLIN}
				_, perr = unix.Poll(pfds, timeout)
			})
			if kerr != nil {
				perr = kerr
			}
		})
		switch {
		case err != nil:
			return err
		case perr == unix.EINTR:
			continue
		case perr != nil:
			return s.closedErr(fmt.Errorf("poll: %w", perr))
		case pfds[1].Revents != 0:
			s.drainKick()
		case pfds[0].Revents != 0:
			return nil
		}
	}
}

// kickControl is control for the kick eventfd.
func (s *sock) kickControl(f func(fd int)) error {
	return s.closedErr(s.kickRC.Control(func(u uintptr) { f(int(u)) }))
}

// drainKick resets the kick eventfd's counter.
func (s *sock) drainKick() {
	s.kickControl(func(fd int) {
		var b [8]byte
		unix.Read(fd, b[:]) // EAGAIN: already drained
	})
}

// setReadDeadline sets Recv's deadline and wakes a Recv that waits.
func (s *sock) setReadDeadline(t time.Time) error {
	s.mu.Lock()
	s.deadline = t
	s.mu.Unlock()
	return s.kickControl(func(fd int) {
		// Any non-zero counter makes an eventfd readable, whatever
		// the byte order.
		unix.Write(fd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	})
}

// shutdown is shutdown(2) of both directions.
func (s *sock) shutdown() error {
	var serr error
	if err := s.control(func(fd int) { serr = unix.Shutdown(fd, unix.SHUT_RDWR) }); err != nil {
		return err
	}
	return serr
}

// close shuts the socket down, which ends every poll(2) waiting on it
// (a hang-up), and closes it. The fd itself is released when the last
// call using it returns: os does not wait for the calls on a blocking
// File, so without the shutdown a waiting poll would keep it forever.
func (s *sock) close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.rc.Control(func(u uintptr) { unix.Shutdown(int(u), unix.SHUT_RDWR) }) // ENOTCONN: the worker's end is gone already
	err := s.f.Close()
	s.kick.Close()
	return err
}
