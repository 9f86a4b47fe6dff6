package balance

// BenchmarkLoopMechanics: how far is the balancer from the floor of the
// system calls it makes, and would io_uring lower that floor? The
// loop's CPU is mostly the kernel's on this VM, and much of that is the
// cost of entering and leaving it (docs/config.md, Round-robin's cost),
// once per accept, sendmsg, getsockopt, close and wait. io_uring does
// the same work with one io_uring_enter(2) per wake-up: the accepts stay
// queued and post each new connection, and the sendmsg and closes of a
// round go in with the next wait. Three loops with the same logic
// (accept up to one message's worth, send it as a CONNS message, read
// ACKs, turn SO_LINGER off and close the acknowledged copies) that
// differ only in how they ask the kernel, and the balancer itself, are
// measured in the same run. The io_uring loops are a trial of the
// mechanism (docs/config.md says what it showed), not a second balancer.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// BenchmarkLoopMechanics hands b.N connections (from 8 clients, paced
// at 4,000/s or as fast as they are answered) through each loop in turn
// to a worker goroutine that acknowledges and answers them, and reports
// the CPU per connection of each loop's process (getrusage RUSAGE_SELF,
// in that process: its runtime's threads and io_uring's workers count,
// as they do for the dispatcher) and their ratio.
// Run it with -benchtime=20000x: the first b.N of 1 measures nothing.
func BenchmarkLoopMechanics(b *testing.B) {
	for _, pace := range []struct {
		name string
		rate int
	}{{"paced", 4000}, {"saturated", 0}} {
		b.Run(pace.name, func(b *testing.B) {
			if err := uringUsable(); err != nil {
				if os.Getenv("CI") != "" {
					b.Fatalf("io_uring: %v", err)
				}
				b.Skipf("io_uring: %v", err)
			}
			n := b.N
			per := map[string]float64{}
			wakes := map[string]float64{}
			// Interleaved, twice each, so that a slow minute of this
			// shared host falls on all of them.
			mechs := []string{"balancer", "epoll", "epoll-close-at-send", "io_uring", "io_uring-multishot"}
			for _, mech := range append(mechs, mechs...) {
				res, err := runMechanism(mech, n, pace.rate)
				if err != nil {
					b.Fatalf("%s: %v", mech, err)
				}
				per[mech] += res.cpu.Seconds() * 1e6 / float64(2*n)
				wakes[mech] += float64(res.wakes) / float64(2*n)
				woke := fmt.Sprintf(", %.2f wake-ups each", float64(res.wakes)/float64(n))
				if mech == "balancer" {
					woke = "" // not counted inside the balancer
				}
				if n > 1 { // the framework's first round, b.N = 1, would fill the 10 lines it shows
					b.Logf("%s %s: %d connections, %.1f µs of its process's CPU each%s, %.0f/s",
						pace.name, mech, n, res.cpu.Seconds()*1e6/float64(n), woke, float64(n)/res.took.Seconds())
				}
			}
			b.ReportMetric(per["epoll"], "epoll-µs/conn")
			b.ReportMetric(per["io_uring"], "uring-µs/conn")
			b.ReportMetric(per["io_uring"]/per["epoll"], "uring/epoll")
			b.ReportMetric(wakes["epoll"], "epoll-wakes/conn")
			b.ReportMetric(wakes["io_uring"], "uring-wakes/conn")
			b.ReportMetric(per["io_uring-multishot"], "multishot-µs/conn")
			b.ReportMetric(per["balancer"], "balancer-µs/conn")
			b.ReportMetric(per["balancer"]/per["epoll"], "balancer/epoll")
			b.ReportMetric(per["epoll-close-at-send"]/per["epoll"], "close-at-send/epoll")
		})
	}
}

// TestLoopMechanismsHandOn checks the loops that the benchmark
// measures: every client is answered and a loop leaves no acknowledged
// copy open, so the figures are of loops that do the whole job.
func TestLoopMechanismsHandOn(t *testing.T) {
	if err := uringUsable(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("io_uring: %v", err)
		}
		t.Skipf("io_uring: %v", err)
	}
	for _, mech := range []string{"balancer", "epoll", "epoll-close-at-send", "io_uring", "io_uring-multishot"} {
		t.Run(mech, func(t *testing.T) {
			res, err := runMechanism(mech, 300, 0)
			if err != nil {
				t.Fatal(err)
			}
			if res.handed != 300 {
				t.Errorf("handed on %d connections, want 300", res.handed)
			}
			if res.leaked != 0 {
				t.Errorf("%d acknowledged copies still open in the loop process when it stopped", res.leaked)
			}
		})
	}
}

// mechResult is what one run of a loop measured.
type mechResult struct {
	cpu    time.Duration // the loop process's CPU
	wakes  int           // waits that returned
	handed int           // connections sent on
	leaked int           // connection copies still open when the loop ended
	took   time.Duration
}

// loopMechEnv makes the test binary the loop process of
// BenchmarkLoopMechanics (its value names the loop: balancer, epoll,
// epoll-close-at-send, io_uring, io_uring-multishot): the listener is fd
// 3, its end of the channel fd 4, an eventfd that stops it fd 5. It
// prints what it measured as "cpu-ns wakes handed leaked".
const loopMechEnv = "COHORT_BALANCE_LOOP_MECHANISM"

// rig is what a loop serves: a listener, its end of a channel, and an
// eventfd that stops it.
type rig struct {
	lfd, ch, stop int
	nextID        uint64
	held          map[uint64]int // connection id → the loop's copy, until its ACK
	handed        int
}

// loopProcess is the loop process's main.
func loopProcess(mech string) int {
	runtime.LockOSThread()
	runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 1) // the loop holds a P, as in the balancer
	r := &rig{lfd: 3, ch: 4, stop: 5, held: map[uint64]int{}}
	cpu0, err := selfCPU() // its runtime's threads and io_uring's workers count, as for the dispatcher
	if err != nil {
		fmt.Fprintln(os.Stderr, "loop:", err)
		return 1
	}
	var wakes int
	switch mech {
	case "epoll":
		wakes, err = r.epollLoop(false)
	case "epoll-close-at-send":
		wakes, err = r.epollLoop(true)
	case "io_uring":
		wakes, err = r.uringLoop(false)
	case "io_uring-multishot":
		wakes, err = r.uringLoop(true)
	case "balancer":
		err = r.balancer()
	default:
		err = fmt.Errorf("no mechanism %q", mech)
	}
	cpu1, cerr := selfCPU()
	if err = errors.Join(err, cerr); err != nil {
		fmt.Fprintln(os.Stderr, "loop:", err)
		return 1
	}
	leaked := openSockets() - 2 - len(r.held) // all but the listener, the channel and the copies not acknowledged yet
	if mech == "balancer" {
		leaked = 0 // its own tests see to that
	}
	fmt.Println((cpu1 - cpu0).Nanoseconds(), wakes, r.handed, leaked)
	return 0
}

// balancer runs the balancer itself, one loop and one worker, to set
// the two loops beside it: it sends the worker's end of its channel to
// the benchmark's worker over the rig's channel, then serves until
// stopped.
func (r *rig) balancer() error {
	listener := os.NewFile(uintptr(r.lfd), "http")
	bal, err := New(context.Background(), Config{
		Listeners: []*os.File{listener}, Names: []string{"http"},
		MaxPending: 64, MaxHandoffs: 8, AckTimeout: 10 * time.Second, AcceptThreads: 1,
		Warnf: func(string, ...any) {}, Infof: func(string, ...any) {},
	})
	if err != nil {
		return err
	}
	defer bal.Close()
	st, err := bal.NewChannel(0)
	if err != nil {
		return err
	}
	if err := unix.Sendmsg(r.ch, []byte{0}, unix.UnixRights(int(st.End.Fd())), nil, 0); err != nil {
		st.Forked(0)
		return fmt.Errorf("hand the worker its end: %w", err)
	}
	st.Forked(1000) // a pid of its own: the balancer sends no signals
	bal.Ready(1000)
	buf := make([]byte, 8)
	for {
		if _, err := unix.Read(r.stop, buf); err != unix.EINTR {
			break
		}
	}
	bal.Stop()
	r.handed = int(bal.Accepted()[0])
	return nil
}

// openSockets counts this process's socket descriptors.
func openSockets() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(target, "socket:") {
			n++
		}
	}
	return n
}

// runMechanism starts a listener, a loop process of kind mech and a
// worker, drives n connections through them and stops them.
func runMechanism(mech string, n, rate int) (mechResult, error) {
	lfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return mechResult{}, err
	}
	listener := os.NewFile(uintptr(lfd), "listener")
	defer listener.Close()
	if err := unix.Bind(lfd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return mechResult{}, err
	}
	if err := unix.Listen(lfd, 4096); err != nil {
		return mechResult{}, err
	}
	sa, err := unix.Getsockname(lfd)
	if err != nil {
		return mechResult{}, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*unix.SockaddrInet4).Port)
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return mechResult{}, err
	}
	loopEnd := os.NewFile(uintptr(pair[0]), "channel")
	defer loopEnd.Close()
	sfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(pair[1])
		return mechResult{}, err
	}
	stop := os.NewFile(uintptr(sfd), "stop")
	defer stop.Close()

	exe, err := os.Executable()
	if err != nil {
		unix.Close(pair[1])
		return mechResult{}, err
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), loopMechEnv+"="+mech)
	cmd.ExtraFiles = []*os.File{listener, loopEnd, stop}
	cmd.Stderr = os.Stderr
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		unix.Close(pair[1])
		return mechResult{}, err
	}
	defer cmd.Process.Kill() // by pid; a no-op once it has exited
	loopEnd.Close()

	workerEnd := pair[1]
	if mech == "balancer" {
		// The balancer makes its own channel and sends the worker's end.
		oob := make([]byte, unix.CmsgSpace(4))
		_, oobn, _, _, err := unix.Recvmsg(pair[1], make([]byte, 1), oob, unix.MSG_CMSG_CLOEXEC)
		unix.Close(pair[1])
		if err != nil {
			return mechResult{}, fmt.Errorf("the balancer's channel: %w", err)
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			return mechResult{}, fmt.Errorf("the balancer's channel: %d messages, %v", len(msgs), err)
		}
		fds, err := unix.ParseUnixRights(&msgs[0])
		if err != nil || len(fds) != 1 {
			return mechResult{}, fmt.Errorf("the balancer's channel: %d fds, %v", len(fds), err)
		}
		workerEnd = fds[0]
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); benchWorker(workerEnd) }() // ends when the loop process closes its end
	start := time.Now()
	derr := drive(addr, n, rate)
	took := time.Since(start)
	time.Sleep(20 * time.Millisecond) // the last ACKs
	stop.Write([]byte{1, 0, 0, 0, 0, 0, 0, 0})
	werr := cmd.Wait()
	wg.Wait()
	res := mechResult{took: took}
	var cpu int64
	if _, err := fmt.Sscan(out.String(), &cpu, &res.wakes, &res.handed, &res.leaked); err != nil && werr == nil {
		werr = fmt.Errorf("loop process printed %q: %w", out.String(), err)
	}
	res.cpu = time.Duration(cpu)
	return res, errors.Join(derr, werr)
}

// drive makes n new-connection requests from 8 clients, at rate a second
// in all (0: each as soon as the last is answered).
func drive(addr string, n, rate int) error {
	const clients = 8
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for c := range clients {
		share := n / clients
		if c < n%clients {
			share++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var tick <-chan time.Time
			if rate > 0 {
				t := time.NewTicker(time.Second * clients / time.Duration(rate))
				defer t.Stop()
				tick = t.C
			}
			for range share {
				if tick != nil {
					<-tick
				}
				if err := request(addr); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

func request(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		return err
	}
	got, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if !strings.HasPrefix(string(got), "HTTP/1.0 200") {
		return fmt.Errorf("answer %q", got)
	}
	return nil
}

// benchWorker is the worker's side of the channel on fd, served with
// cohort's own rr.Worker (which also refuses a malformed CONNS from the
// minimal loops): it acknowledges each message at once and answers its
// connections. It sends no HELLO, so the balancer gives it one
// connection until its first ACK, as for a worker older than HELLO.
func benchWorker(fd int) {
	w, err := rr.NewWorker(os.NewFile(uintptr(fd), rr.FDName))
	if err != nil {
		unix.Close(fd)
		return
	}
	defer w.Close()
	for {
		ds, err := w.Recv()
		if err != nil {
			return
		}
		ids := make([]uint64, len(ds))
		for i, d := range ds {
			ids[i] = d.ID
		}
		if err := w.Send(rr.TypeAck, ids); err != nil {
			for _, d := range ds {
				d.File.Close()
			}
			return
		}
		for _, d := range ds {
			go answer(d.File)
		}
	}
}

// answer reads a request on f and answers it as the hello worker does.
func answer(f *os.File) {
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1024)
	got := 0
	for got < len(buf) && !strings.Contains(string(buf[:got]), "\r\n\r\n") {
		n, err := c.Read(buf[got:])
		got += n
		if err != nil {
			return
		}
	}
	io.WriteString(c, "HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")
	c.(*net.TCPConn).CloseWrite()
}

// conns encodes fds as one CONNS message into msg, numbering them.
func (r *rig) conns(fds []int, msg []byte) []byte {
	msg = msg[:8+16*len(fds)]
	clear(msg)
	msg[0], msg[1] = 1, byte(rr.TypeConns)
	binary.LittleEndian.PutUint16(msg[2:], uint16(len(fds)))
	for i, fd := range fds {
		r.nextID++
		r.held[r.nextID] = fd
		binary.LittleEndian.PutUint64(msg[8+16*i:], r.nextID)
	}
	r.handed += len(fds)
	return msg
}

// acked returns the copies an ACK message acknowledges, forgetting them.
func (r *rig) acked(msg []byte, out []int) []int {
	if len(msg) < 8 || msg[1] != byte(rr.TypeAck) {
		return out
	}
	count := int(binary.LittleEndian.Uint16(msg[2:]))
	for i := 0; i < count && 8+8*i+8 <= len(msg); i++ {
		id := binary.LittleEndian.Uint64(msg[8+8*i:])
		if fd, ok := r.held[id]; ok {
			delete(r.held, id)
			out = append(out, fd)
		}
	}
	return out
}

// lingerOff is rr.Conn.Close's check before the close of a copy, for
// the io_uring loop, whose ring does the close itself.
func lingerOff(fd int) {
	if l, err := unix.GetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER); err == nil && l.Onoff != 0 && l.Linger > 0 {
		unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{})
	}
}

// epollLoop is the event loop's way: a blocking epoll_wait, accept4
// until EAGAIN, one sendmsg, recv until EAGAIN (all four with
// RawSyscall, as in the balancer) and the SO_LINGER check and close of
// each acknowledged copy, each a system call. With closeAtSend it
// closes its copies right after the sendmsg instead (what a protocol
// without re-dispatch on a worker's death would allow: the copy in
// flight keeps the socket, so that close never frees it and cannot
// linger, and needs no SO_LINGER check); ACKs are then read and ignored.
func (r *rig) epollLoop(closeAtSend bool) (wakes int, _ error) {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return 0, err
	}
	defer unix.Close(ep)
	if err := unix.SetNonblock(r.lfd, true); err != nil {
		return 0, err
	}
	for _, fd := range []int{r.lfd, r.ch, r.stop} {
		if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}); err != nil {
			return 0, err
		}
	}
	events := make([]unix.EpollEvent, maxEvents)
	msg := make([]byte, 8+rr.MaxFDs*16)
	in := make([]byte, 8+256*8)
	var fds, done []int
	for {
		n, err := epollWait(ep, events, -1)
		if err == unix.EINTR {
			runtime.Gosched()
			continue
		}
		if err != nil {
			return wakes, err
		}
		wakes++
		for _, ev := range events[:n] {
			switch int(ev.Fd) {
			case r.stop:
				return wakes, nil
			case r.ch:
				for {
					got, _, errno := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(r.ch), uintptr(unsafe.Pointer(&in[0])), uintptr(len(in)), unix.MSG_DONTWAIT, 0, 0)
					if errno != 0 || got == 0 {
						break
					}
					done = r.acked(in[:got], done[:0])
					for _, fd := range done {
						rr.NewConn(fd, 0).Close() // the balancer's own close of a copy
					}
				}
			case r.lfd:
				fds = fds[:0]
				for len(fds) < rr.MaxFDs {
					nfd, errno := accept4(r.lfd)
					if errno != 0 {
						break
					}
					fds = append(fds, int(nfd))
				}
				if len(fds) > 0 {
					m := r.conns(fds, msg)
					rights := unix.UnixRights(fds...)
					iov := unix.Iovec{Base: &m[0]}
					iov.SetLen(len(m))
					hdr := unix.Msghdr{Iov: &iov, Iovlen: 1, Control: &rights[0]}
					hdr.SetControllen(len(rights))
					if _, _, errno := unix.RawSyscall(unix.SYS_SENDMSG, uintptr(r.ch), uintptr(unsafe.Pointer(&hdr)), unix.MSG_DONTWAIT); errno != 0 {
						return wakes, fmt.Errorf("sendmsg: %w", errno)
					}
					if closeAtSend {
						for _, fd := range fds {
							unix.Close(fd)
						}
						clear(r.held)
					}
				}
			}
		}
	}
}

// uringAcceptDepth is how many single-shot accepts the io_uring loop
// keeps queued: a stand-in for the room ready workers have, which bounds
// what the balancer accepts (a multishot accept takes every connection
// that comes, room or not).
const uringAcceptDepth = 8

// uringLoop does the same with io_uring: accepts (uringAcceptDepth
// single-shot ones, or one multishot), a recv on the channel and a poll
// of the stop eventfd stay queued; each wake-up reaps their completions
// and queues the round's sendmsg and closes, which the next
// io_uring_enter submits as it waits.
func (r *rig) uringLoop(multishot bool) (wakes int, _ error) {
	ring, err := newURing(256)
	if err != nil {
		return 0, err
	}
	defer ring.close()
	const (
		tagAccept = iota + 1
		tagRecv
		tagStop
		tagSend
		tagClose
	)
	in := make([]byte, 8+256*8)
	armAccept := func() {
		s := ring.next()
		s.opcode, s.fd, s.opFlags, s.userData = ioringOpAccept, int32(r.lfd), unix.SOCK_CLOEXEC, tagAccept
		if multishot {
			s.ioprio = ioringAcceptMultishot
		}
	}
	armRecv := func() {
		s := ring.next()
		s.opcode, s.fd, s.userData = ioringOpRecv, int32(r.ch), tagRecv
		s.addr, s.len = uint64(uintptr(unsafe.Pointer(&in[0]))), uint32(len(in))
	}
	armAccept()
	for range uringAcceptDepth - 1 {
		if !multishot {
			armAccept()
		}
	}
	armRecv()
	s := ring.next()
	s.opcode, s.fd, s.opFlags, s.userData = ioringOpPollAdd, int32(r.stop), unix.POLLIN, tagStop

	// A sendmsg's header, iovec and buffers must outlive its
	// submission; a round needs one, and the ring holds at most 256.
	type sendBuf struct {
		hdr      unix.Msghdr
		iov      unix.Iovec
		msg, oob []byte
	}
	sends := make([]sendBuf, 256)
	for i := range sends {
		sends[i].msg = make([]byte, 8+rr.MaxFDs*16)
		sends[i].oob = make([]byte, unix.CmsgSpace(rr.MaxFDs*4))
	}
	nextSend := 0
	var fds, done []int
	for {
		if err := ring.enter(1); err != nil {
			if err == unix.EINTR {
				runtime.Gosched() // the runtime's signal (see loop.wait)
				continue
			}
			return wakes, err
		}
		wakes++
		fds = fds[:0]
		for c, ok := ring.reap(); ok; c, ok = ring.reap() {
			switch c.userData {
			case tagStop:
				// The closes queued this round are still to go in.
				return wakes, ring.enter(0)
			case tagAccept:
				if c.res >= 0 {
					fds = append(fds, int(c.res))
				}
				if c.flags&ioringCQEFMore == 0 {
					armAccept()
				}
			case tagRecv:
				if c.res == 0 {
					return wakes, errors.New("worker closed the channel")
				}
				if c.res > 0 {
					done = r.acked(in[:c.res], done[:0])
					for _, fd := range done {
						lingerOff(fd)
						s := ring.next()
						s.opcode, s.fd, s.flags, s.userData = ioringOpClose, int32(fd), ioringSQECQESkipSuccess, tagClose
					}
				}
				armRecv()
			case tagSend, tagClose:
				if c.res < 0 {
					return wakes, fmt.Errorf("io_uring op %d: %w", c.userData, unix.Errno(-c.res))
				}
			}
		}
		for len(fds) > 0 {
			k := min(len(fds), rr.MaxFDs)
			sb := &sends[nextSend]
			nextSend = (nextSend + 1) % len(sends)
			msg := r.conns(fds[:k], sb.msg)
			rights := unix.UnixRights(fds[:k]...)
			copy(sb.oob, rights)
			sb.iov = unix.Iovec{Base: &msg[0]}
			sb.iov.SetLen(len(msg))
			sb.hdr = unix.Msghdr{Iov: &sb.iov, Iovlen: 1, Control: &sb.oob[0]}
			sb.hdr.SetControllen(len(rights))
			s := ring.next()
			s.opcode, s.fd, s.flags, s.userData = ioringOpSendmsg, int32(r.ch), ioringSQECQESkipSuccess, tagSend
			s.addr, s.len = uint64(uintptr(unsafe.Pointer(&sb.hdr))), 1
			fds = fds[k:]
		}
	}
}
