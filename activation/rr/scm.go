package rr

// The only functions that touch SCM_RIGHTS. Every fd has one owner:
// trySendMsg never closes the fds it sends; tryRecvMsg hands every fd it
// received to its caller on success and closes all of them on any error.

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// oobSize fits one SCM_RIGHTS message with MaxFDs fds, plus room to notice
// when a peer sends more (the kernel then sets MSG_CTRUNC).
var oobSize = unix.CmsgSpace((MaxFDs + 1) * 4)

// trySendMsg writes b as one message with fds attached as SCM_RIGHTS
// (the fds stay owned by the caller), without waiting for room: it
// returns an error wrapping unix.EAGAIN when the peer's receive queue is
// full. It never raises SIGPIPE.
func trySendMsg(rc syscall.RawConn, b []byte, fds []int) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	var (
		n    int
		serr error
	)
	err := rc.Write(func(fd uintptr) bool {
		for {
			n, serr = rawSendmsg(int(fd), b, oob, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
			if serr != unix.EINTR {
				return true
			}
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("sendmsg: %w", err)
	}
	if n != len(b) {
		return fmt.Errorf("sendmsg: short write (%d of %d bytes)", n, len(b))
	}
	return nil
}

// errEOF is returned by tryRecvMsg when the peer closed its end.
var errEOF = errors.New("peer closed the channel")

// recvResult judges what one recvmsg(2) of tryRecvMsg returned: the
// payload and the fds it carried, or an error (errEOF at end of stream,
// ErrProtocol for a malformed message), in which case every fd received
// is closed.
func recvResult(b, oob []byte, n, oobn, flags int, err error) ([]byte, []int, error) {
	n = max(n, 0)
	fds, perr := parseRights(oob[:max(0, min(oobn, len(oob)))])
	switch {
	case errors.Is(err, io.EOF) && len(fds) == 0:
		err = errEOF
	case err != nil:
		err = fmt.Errorf("recvmsg: %w", err)
	case perr != nil:
		err = fmt.Errorf("recvmsg: %w: %w", ErrProtocol, perr)
	case flags&unix.MSG_CTRUNC != 0:
		err = fmt.Errorf("recvmsg: %w: control data truncated (more than %d fds?)", ErrProtocol, MaxFDs)
	case flags&unix.MSG_TRUNC != 0:
		err = fmt.Errorf("recvmsg: %w: message longer than %d bytes", ErrProtocol, len(b))
	case n == 0 && len(fds) == 0:
		err = errEOF
	case n == 0:
		err = fmt.Errorf("recvmsg: %w: empty message with %d fds", ErrProtocol, len(fds))
	}
	if err != nil {
		closeFDs(fds)
		return nil, nil, err
	}
	return b[:n], fds, nil
}

// tryRecvMsg reads one message into b, using oob (at least oobSize bytes)
// for control data, without waiting (MSG_DONTWAIT): with nothing queued
// it returns unix.EAGAIN itself, unwrapped. It returns the payload and the
// received fds, opened close-on-exec, which the caller then owns. On any
// error, including a truncated message or control data (MSG_TRUNC,
// MSG_CTRUNC), it closes every fd it received and returns none. At end of
// stream it returns errEOF.
func tryRecvMsg(rc syscall.RawConn, b, oob []byte) ([]byte, []int, error) {
	var (
		n, oobn, flags int
		rerr           error
	)
	err := rc.Read(func(fd uintptr) bool {
		rerr = recvRetrying(func() error {
			var err error
			n, oobn, flags, err = rawMsg(unix.SYS_RECVMSG, int(fd), b, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
			return err
		})
		return true
	})
	if err == nil {
		err = rerr
	}
	if err == unix.EAGAIN {
		return nil, nil, err // the common case of a poll: no error to build
	}
	return recvResult(b, oob, n, oobn, flags, err)
}

// parseRights returns every fd in every SCM_RIGHTS message of oob. It keeps
// going past a bad message so that the caller can close all fds.
func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control messages: %w", err)
	}
	var fds []int
	var firstErr error
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			if firstErr == nil {
				firstErr = fmt.Errorf("unexpected control message level %d type %d", msgs[i].Header.Level, msgs[i].Header.Type)
			}
			continue
		}
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil && firstErr == nil {
			firstErr = fmt.Errorf("parse SCM_RIGHTS: %w", err)
		}
		fds = append(fds, got...)
	}
	return fds, firstErr
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// rawFD returns f's descriptor without switching it to blocking mode (as
// f.Fd would, for the open file description shared with every copy of it).
// The caller must own f and keep it open while using the result.
func rawFD(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, err
	}
	return fd, nil
}

// workerSock turns f (a connected unix SOCK_SEQPACKET socket) into a
// sock. It always closes f; the sock holds its own copy.
func workerSock(f *os.File) (*sock, error) {
	defer f.Close()
	fd, err := rawFD(f)
	if err != nil {
		return nil, fmt.Errorf("round-robin channel %s: %w", f.Name(), err)
	}
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return nil, fmt.Errorf("round-robin channel %s: getsockopt SO_TYPE: %w", f.Name(), err)
	}
	if typ != unix.SOCK_SEQPACKET {
		return nil, fmt.Errorf("round-robin channel %s: socket type %d, want SOCK_SEQPACKET", f.Name(), typ)
	}
	own, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("round-robin channel %s: dup: %w", f.Name(), err)
	}
	return newSock(own, f.Name())
}

// The dispatcher's non-waiting sendmsg and recvmsg go through RawSyscall,
// not x/sys's SendmsgN and Recvmsg (Syscall): a Syscall from a process
// whose threads were all idle wakes the Go runtime's sysmon thread, which
// then polls every 20 µs for a while; with a wake-up per connection that
// thread cost a fifth of the balancer's CPU (issue 19's profile). Both
// calls are MSG_DONTWAIT on a non-blocking socket, so they never block,
// which is what RawSyscall requires.

// rawMsg is sendmsg(2) or recvmsg(2) (call) of b and oob on fd; it
// returns the call's result and, for recvmsg, the control data's length
// and the message's flags.
func rawMsg(call uintptr, fd int, b, oob []byte, flags int) (n, oobn, rflags int, err error) {
	var iov unix.Iovec
	var msg unix.Msghdr
	if len(b) > 0 {
		iov.Base = &b[0]
		iov.SetLen(len(b))
		msg.Iov = &iov
		msg.Iovlen = 1
	}
	if len(oob) > 0 {
		msg.Control = &oob[0]
		msg.SetControllen(len(oob))
	}
	r, _, errno := unix.RawSyscall(call, uintptr(fd), uintptr(unsafe.Pointer(&msg)), uintptr(flags))
	if errno != 0 {
		return 0, 0, 0, errno
	}
	return int(r), int(msg.Controllen), int(msg.Flags), nil
}

// rawSendmsg is sendmsg(2) of b with control data oob on fd.
func rawSendmsg(fd int, b, oob []byte, flags int) (int, error) {
	n, _, _, err := rawMsg(unix.SYS_SENDMSG, fd, b, oob, flags)
	return n, err
}

// recvRetrying calls recv until it fails with something other than
// EINTR, or with ECONNRESET a fifth time. A peer that closes its end with
// messages it did not read makes the kernel report ECONNRESET once,
// before the messages it sent that we have not read yet (an ACK, say):
// read on, they follow, then end of stream.
func recvRetrying(recv func() error) error {
	for resets := 0; ; {
		err := recv()
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.ECONNRESET && resets < 4:
			resets++
			continue
		}
		return err
	}
}

// recvBatch is how many messages one recvmmsg(2) of the dispatcher's end
// reads: a loop serving a stream of connections finds several ACKs (and
// CLOSEDs) queued per worker, and each recvmsg(2) costs at least 1.1 µs
// on a VM, so does the one that finds the queue empty (issue 19).
const recvBatch = 8

// mmsghdr is struct mmsghdr of recvmmsg(2); x/sys/unix has the system
// call's number but no type or wrapper for it. Go pads it as C does.
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
}

// inbox holds what one recvmmsg(2) read: the Channel hands the messages
// out one at a time (Recv, TryRecv), each checked by recvResult as a
// recvmsg(2)'s would be.
type inbox struct {
	bufs [recvBatch][]byte
	oobs [recvBatch][]byte
	iovs [recvBatch]unix.Iovec
	hdrs [recvBatch]mmsghdr
	// n messages were read, next is the first not handed out; short: the
	// read found the queue empty before filling the batch.
	n, next int
	short   bool
}

func newInbox() *inbox {
	in := &inbox{}
	for i := range recvBatch {
		in.bufs[i] = make([]byte, MaxMessage+1) // +1: a longer message is truncated, and refused
		in.oobs[i] = make([]byte, oobSize)
		in.iovs[i].Base = &in.bufs[i][0]
		in.iovs[i].SetLen(len(in.bufs[i]))
		in.hdrs[i].hdr = unix.Msghdr{Iov: &in.iovs[i], Iovlen: 1, Control: &in.oobs[i][0]}
	}
	return in
}

// tryRead fills the inbox with what is queued on fd, without waiting:
// unix.EAGAIN itself when nothing is, another error (as recvResult
// reports it) when the read failed.
func (in *inbox) tryRead(rc syscall.RawConn) error {
	for i := range recvBatch {
		in.hdrs[i].hdr.SetControllen(len(in.oobs[i])) // the kernel wrote what it used
	}
	var n int
	var rerr error
	err := rc.Read(func(fd uintptr) bool {
		rerr = recvRetrying(func() error {
			r, _, errno := unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&in.hdrs[0])), recvBatch, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC, 0, 0)
			if errno != 0 {
				n = 0
				return errno
			}
			n = int(r)
			return nil
		})
		return true
	})
	if err == nil {
		err = rerr
	}
	in.n, in.next, in.short = 0, 0, false
	if err == unix.EAGAIN {
		return err
	}
	if err != nil {
		_, _, err = recvResult(nil, nil, 0, 0, 0, err)
		return err
	}
	in.n, in.short = n, n < recvBatch
	return nil
}

// pop hands out the next message read, as recvResult reports it; only
// when buffered() > 0.
func (in *inbox) pop() ([]byte, []int, error) {
	i := in.next
	in.next++
	h := &in.hdrs[i]
	return recvResult(in.bufs[i], in.oobs[i], int(h.len), int(h.hdr.Controllen), int(h.hdr.Flags), nil)
}

// buffered is how many messages were read and not handed out.
func (in *inbox) buffered() int { return in.n - in.next }

// drop closes the fds of the messages not handed out and forgets them:
// after an error nothing more is read from the channel.
func (in *inbox) drop() {
	for in.buffered() > 0 {
		if _, fds, err := in.pop(); err == nil { // recvResult closed them otherwise
			closeFDs(fds)
		}
	}
}
