package probe

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The test binary is also the helper process the tests inspect: with
// PROBE_HELPER set it waits on the listener at fd 3 in the named way.
func TestMain(m *testing.M) {
	if how := os.Getenv("PROBE_HELPER"); how != "" {
		os.Exit(helper(how))
	}
	os.Exit(m.Run())
}

// helper waits on fd 3 as asked, after printing "waiting", until killed:
//
//	accept  a thread blocked in accept4
//	poll    a thread blocked in poll (ppoll) on fd 3 and a pipe
//	select  a thread blocked in select (pselect6) on fd 3
//	epoll   Go's net.FileListener: fd 3's copy in the runtime's epoll set
//	idle    holds fd 3, waits on nothing related (a sleep)
//	parent  starts a child "accept" that inherits fd 3, and waits for it
func helper(how string) int {
	const fd = 3
	runtime.LockOSThread()
	fmt.Println("waiting")
	switch how {
	case "accept":
		for {
			nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
			if err == nil {
				unix.Close(nfd)
			}
		}
	case "poll":
		var p [2]int
		if err := unix.Pipe(p[:]); err != nil {
			return 1
		}
		fds := []unix.PollFd{{Fd: int32(p[0]), Events: unix.POLLIN}, {Fd: fd, Events: unix.POLLIN}}
		for {
			unix.Poll(fds, -1)
		}
	case "select":
		for {
			var set unix.FdSet
			set.Set(fd)
			unix.Select(fd+1, &set, nil, nil, nil)
		}
	case "epoll":
		ln, err := net.FileListener(os.NewFile(fd, "l"))
		if err != nil {
			return 1
		}
		_ = ln
		select {}
	case "idle":
		for {
			time.Sleep(time.Hour)
		}
	case "parent":
		self, _ := os.Executable()
		c := exec.Command(self)
		c.Env = append(os.Environ(), "PROBE_HELPER=accept")
		c.ExtraFiles = []*os.File{os.NewFile(fd, "l")}
		c.Stdout = os.Stdout
		if c.Start() != nil {
			return 1
		}
		c.Wait()
		return 0
	}
	return 2
}

// listener is a listening TCP socket on 127.0.0.1 and its inode.
func listener(t testing.TB) (*os.File, uint64) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := l.(*net.TCPListener).File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return f, st.Ino
}

// startHelper starts the helper with f at fd 3 and waits for "waiting";
// cleanup kills it (and, for "parent", its process group) by pid.
func startHelper(t testing.TB, how string, f *os.File) int {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	c := exec.Command(self)
	c.Env = append(os.Environ(), "PROBE_HELPER="+how)
	c.ExtraFiles = []*os.File{f}
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := c.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	pid := c.Process.Pid
	t.Cleanup(func() {
		syscall.Kill(-pid, syscall.SIGKILL)
		c.Wait()
	})
	lines := make(chan string, 4)
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			lines <- s.Text()
		}
		close(lines)
	}()
	want := 1
	if how == "parent" {
		want = 2 // the parent's and the child's
	}
	for range want {
		select {
		case l := <-lines:
			if l != "waiting" {
				t.Fatalf("helper %s said %q", how, l)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("helper %s did not start", how)
		}
	}
	return pid
}

// waitFound polls Accepting as the dispatcher does, for up to 5 s.
func waitFound(t *testing.T, pid int, tg Targets) (Found, error) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		f, err := Accepting(context.Background(), pid, tg, true)
		if err != nil || f.PID != 0 || time.Now().After(deadline) {
			return f, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestAccepting: real processes waiting in each way are found, and say
// how; one that holds the socket but waits on nothing is not, and neither
// is one waiting on another socket.
func TestAccepting(t *testing.T) {
	for _, tt := range []struct {
		how, want string
		inChild   bool
	}{
		{"accept", "accept", false},
		{"poll", "poll on one of fds [3]", false},
		{"select", "select", false}, // pselect6 or select
		{"epoll", "epoll fd", false},
		{"parent", "accept", true},
	} {
		t.Run(tt.how, func(t *testing.T) {
			t.Parallel()
			f, ino := listener(t)
			pid := startHelper(t, tt.how, f)
			found, err := waitFound(t, pid, Targets{Inodes: []uint64{ino}})
			if err != nil {
				t.Fatal(err)
			}
			if found.PID == 0 || !strings.Contains(found.How, tt.want) {
				t.Fatalf("found %+v, want a wait by %q", found, tt.want)
			}
			if (found.PID != pid) != tt.inChild {
				t.Errorf("found in pid %d, helper pid %d; want in a child: %v", found.PID, pid, tt.inChild)
			}
			t.Logf("%s: %+v", tt.how, found)

			// The same process, asked about another socket: nothing.
			_, other := listener(t)
			if found, err := Accepting(context.Background(), pid, Targets{Inodes: []uint64{other}}, true); err != nil || found.PID != 0 {
				t.Errorf("asked about another socket: %+v, %v; want nothing", found, err)
			}
			// As a channel, a listener's accept does not count.
			if tt.how == "accept" {
				if found, err := Accepting(context.Background(), pid, Targets{Inodes: []uint64{ino}, Channel: true}, true); err != nil || found.PID != 0 {
					t.Errorf("accept on a channel target: %+v, %v; want nothing", found, err)
				}
			}
		})
	}
}

// TestNotAccepting: holding the listener is not waiting on it, and a
// process that is gone waits on nothing, without an error.
func TestNotAccepting(t *testing.T) {
	t.Parallel()
	f, ino := listener(t)
	pid := startHelper(t, "idle", f)
	time.Sleep(100 * time.Millisecond) // let it reach its sleep
	if found, err := Accepting(context.Background(), pid, Targets{Inodes: []uint64{ino}}, true); err != nil || found.PID != 0 {
		t.Errorf("idle helper: %+v, %v; want nothing", found, err)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	var ws syscall.WaitStatus
	syscall.Wait4(pid, &ws, 0, nil)
	if found, err := Accepting(context.Background(), pid, Targets{Inodes: []uint64{ino}}, true); err != nil || found.PID != 0 {
		t.Errorf("reaped helper: %+v, %v; want nothing, no error", found, err)
	}
}

// BenchmarkAccepting is the CPU one check costs, against the baseline of
// reading one /proc/PID/stat in the same run: "epoll" finds the helper at
// once; "idle" looks at everything of the process (fds, threads) and
// finds nothing; "idle-children" also looks through every process in
// /proc for descendants (what the dispatcher does every 200 ms at most).
func BenchmarkAccepting(b *testing.B) {
	cpu := func() time.Duration {
		var ru unix.Rusage
		unix.Getrusage(unix.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	run := func(b *testing.B, check func()) {
		c0 := cpu()
		for b.Loop() {
			check()
		}
		b.ReportMetric(float64((cpu()-c0).Microseconds())/float64(b.N), "cpu-µs/op")
	}
	for _, how := range []string{"epoll", "idle"} {
		f, ino := listener(b)
		pid := startHelper(b, how, f)
		b.Run("stat-baseline-"+how, func(b *testing.B) {
			run(b, func() { readBounded(fmt.Sprintf("/proc/%d/stat", pid), maxSmall) })
		})
		b.Run(how, func(b *testing.B) {
			run(b, func() { Accepting(context.Background(), pid, Targets{Inodes: []uint64{ino}}, false) })
		})
		if how == "idle" {
			b.Run(how+"-children", func(b *testing.B) {
				run(b, func() { Accepting(context.Background(), pid, Targets{Inodes: []uint64{ino}}, true) })
			})
		}
	}
}

// TestBlocked: a thread of this process blocked in read(2) on a pipe is
// listed with its call and fd; one that has returned is not.
func TestBlocked(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	tids := make(chan int, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tids <- unix.Gettid()
		unix.Read(p[0], make([]byte, 1)) // blocking: a plain pipe fd, not Go's
	}()
	tid := <-tids
	listed := func() bool {
		calls, err := Blocked(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range calls {
			if c.TID == tid && c.NR == unix.SYS_READ && c.Args[0] == uint64(p[0]) {
				return true // until then it may be on its way (a futex)
			}
		}
		return false
	}
	for deadline := time.Now().Add(5 * time.Second); !listed(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			unix.Close(p[1])
			t.Fatalf("thread %d, blocked in read(%d), is not listed within 5s", tid, p[0])
		}
	}
	unix.Write(p[1], []byte{1})
	unix.Close(p[1])
	<-done
	if listed() {
		t.Errorf("thread %d is listed after its read returned", tid)
	}
}

// BenchmarkBlockedSelf is what a look of the balancer's close guard
// costs: Blocked on the test process (its thread count is in the output).
func BenchmarkBlockedSelf(b *testing.B) {
	var n int
	for b.Loop() {
		calls, err := Blocked(os.Getpid())
		if err != nil {
			b.Fatal(err)
		}
		n = len(calls)
	}
	tasks, _ := os.ReadDir("/proc/self/task")
	b.ReportMetric(float64(len(tasks)), "threads")
	b.ReportMetric(float64(n), "blocked")
}
