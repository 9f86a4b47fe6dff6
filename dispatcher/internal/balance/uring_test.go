package balance

// A minimal io_uring for BenchmarkLoopMechanics: setup, the two rings
// mapped, an SQE at a time, one enter, completions reaped in order.
// Written here rather than taken from a library because none is served
// by the module proxy this project builds from (giouring, iouring-go and
// go-uring were refused), and the trial needs only these few calls of
// io_uring_setup(2) and io_uring_enter(2); the layouts are the kernel's
// (include/uapi/linux/io_uring.h).

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Opcodes, flags and offsets from include/uapi/linux/io_uring.h.
const (
	ioringOpPollAdd = 6
	ioringOpSendmsg = 9
	ioringOpAccept  = 13
	ioringOpClose   = 19
	ioringOpRecv    = 27

	ioringSQECQESkipSuccess = 1 << 6 // IOSQE_CQE_SKIP_SUCCESS: a CQE only on failure
	ioringAcceptMultishot   = 1 << 0 // in sqe.ioprio
	ioringCQEFMore          = 1 << 1 // a multishot request stays armed

	ioringSetupSingleIssuer = 1 << 12
	ioringSetupDeferTaskrun = 1 << 13 // completions run in the loop's own io_uring_enter, not by interrupting it
	ioringEnterGetEvents    = 1 << 0
	ioringFeatSingleMmap    = 1 << 0

	ioringOffSQRing = 0
	ioringOffSQEs   = 0x10000000
)

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

// uringSQE is struct io_uring_sqe (64 bytes) with the fields used here.
type uringSQE struct {
	opcode   uint8
	flags    uint8
	ioprio   uint16
	fd       int32
	off      uint64
	addr     uint64
	len      uint32
	opFlags  uint32
	userData uint64
	bufIndex uint16
	pers     uint16
	fileIdx  uint32
	addr3    uint64
	pad      uint64
}

// uringCQE is struct io_uring_cqe (16 bytes).
type uringCQE struct {
	userData uint64
	res      int32
	flags    uint32
}

type uring struct {
	fd                int
	ringMem, sqeMem   []byte
	sqTail, sqMask    *uint32
	sqes              []uringSQE
	cqHead, cqTail    *uint32
	cqMask            *uint32
	cqes              []uringCQE
	tail, unsubmitted uint32
}

// uringUsable reports why io_uring cannot be used here (a kernel before
// 6.1, kernel.io_uring_disabled, a seccomp filter), nil if it can.
func uringUsable() error {
	r, err := newURing(8)
	if err != nil {
		return err
	}
	r.close()
	return nil
}

func newURing(entries uint32) (*uring, error) {
	var p uringParams
	p.flags = ioringSetupSingleIssuer | ioringSetupDeferTaskrun
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &uring{fd: int(fd)}
	if p.features&ioringFeatSingleMmap == 0 {
		r.close()
		return nil, errors.New("io_uring_setup: no IORING_FEAT_SINGLE_MMAP (a kernel before 5.4)")
	}
	size := max(p.sqOff.array+p.sqEntries*4, p.cqOff.cqes+p.cqEntries*uint32(unsafe.Sizeof(uringCQE{})))
	var err error
	if r.ringMem, err = unix.Mmap(r.fd, ioringOffSQRing, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		r.close()
		return nil, fmt.Errorf("mmap io_uring rings: %w", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, ioringOffSQEs, int(p.sqEntries)*int(unsafe.Sizeof(uringSQE{})), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		r.close()
		return nil, fmt.Errorf("mmap io_uring SQEs: %w", err)
	}
	base := unsafe.Pointer(&r.ringMem[0])
	at := func(off uint32) *uint32 { return (*uint32)(unsafe.Add(base, off)) }
	r.sqTail, r.sqMask = at(p.sqOff.tail), at(p.sqOff.ringMask)
	array := unsafe.Slice(at(p.sqOff.array), p.sqEntries)
	for i := range array {
		array[i] = uint32(i) // ring slot i holds SQE i
	}
	r.sqes = unsafe.Slice((*uringSQE)(unsafe.Pointer(&r.sqeMem[0])), p.sqEntries)
	r.cqHead, r.cqTail, r.cqMask = at(p.cqOff.head), at(p.cqOff.tail), at(p.cqOff.ringMask)
	r.cqes = unsafe.Slice((*uringCQE)(unsafe.Add(base, p.cqOff.cqes)), p.cqEntries)
	r.tail = atomic.LoadUint32(r.sqTail)
	return r, nil
}

func (r *uring) close() {
	if r.sqeMem != nil {
		unix.Munmap(r.sqeMem)
	}
	if r.ringMem != nil {
		unix.Munmap(r.ringMem)
	}
	unix.Close(r.fd)
}

// next returns a zeroed SQE to fill; the next enter submits it. The
// caller queues no more than the ring holds between two enters.
func (r *uring) next() *uringSQE {
	s := &r.sqes[r.tail&*r.sqMask]
	*s = uringSQE{}
	r.tail++
	r.unsubmitted++
	return s
}

// enter submits the queued SQEs and waits until wait completions are
// there, with RawSyscall for the same reason as the event loop's
// epoll_wait (accept.go).
func (r *uring) enter(wait uint32) error {
	atomic.StoreUint32(r.sqTail, r.tail) // the kernel reads the SQEs written before it
	n := r.unsubmitted
	r.unsubmitted = 0
	_, _, errno := unix.RawSyscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(n), uintptr(wait), ioringEnterGetEvents, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// reap takes the next completion, if there is one.
func (r *uring) reap() (uringCQE, bool) {
	head := atomic.LoadUint32(r.cqHead)
	if head == atomic.LoadUint32(r.cqTail) {
		return uringCQE{}, false
	}
	c := r.cqes[head&*r.cqMask]
	atomic.StoreUint32(r.cqHead, head+1)
	return c, true
}
