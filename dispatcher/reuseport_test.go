package dispatcher

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/sockets"
	"github.com/cohort-dev/cohort/internal/testsync"
	"golang.org/x/sys/unix"
)

// socketInode is the inode of a socket fd, as /proc/PID/fd/N shows it
// ("socket:[INODE]").
func socketInode(t *testing.T, f *os.File) string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("socket:[%d]", st.Ino)
}

// TestReusePortOwnSockets: worker i is handed exactly slot i's socket,
// through the plain LISTEN_FDS protocol (the listener's own name, its own
// pid), and holds no other slot's socket; after a reload, the new worker
// of slot i has the same socket.
func TestReusePortOwnSockets(t *testing.T) {
	t.Parallel()
	f := startFromFile(t, appFile{workers: 3, mode: "reuseport"})
	inodes := map[string]int{} // socket inode → slot
	for i, set := range f.slots {
		inodes[socketInode(t, set[0])] = i
	}
	check := func(when string) {
		st := f.status(t)
		if len(st.Workers) != 3 {
			t.Fatalf("%s: %d workers; want 3", when, len(st.Workers))
		}
		for _, w := range st.Workers {
			// The worker's library may have moved the socket off fd 3;
			// what matters is which sockets it holds.
			var held []int
			fds, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", w.PID))
			for _, p := range fds {
				l, _ := os.Readlink(p)
				if slot, ok := inodes[l]; ok {
					held = append(held, slot)
				}
			}
			if len(held) != 1 || held[0] != w.Index {
				t.Errorf("%s: worker %d (pid %d) holds the sockets of slots %v; want only its own (%d)", when, w.Index, w.PID, held, w.Index)
			}
		}
		// What the worker saw: its own LISTEN_PID, the listener's name.
		seen := map[string]bool{}
		testsync.WaitFor(t, 20*time.Second, "every worker to answer", func() bool {
			body, err := get("http://" + f.addr + "/")
			if err != nil {
				t.Fatal(err)
			}
			if field(body, "fdnames") != "http" || field(body, "listen_pid") != field(body, "pid") {
				t.Fatalf("%s: worker answered %q; want fdnames=http and listen_pid=its pid", when, body)
			}
			seen[field(body, "worker")] = true
			return len(seen) == 3
		})
	}
	check("at start")
	if _, err := f.call(t, 30*time.Second, control.Request{Cmd: control.CmdReload}); err != nil {
		t.Fatalf("reload: %v", err)
	}
	check("after a reload")
}

// TestReusePortKilledWorkerQueue: a worker dies of SIGKILL under load
// (at a point where it holds no connection, so that nothing of its own is
// lost). The connections the kernel steers to its socket meanwhile wait
// in that socket's queue, which the dispatcher keeps open, and its
// replacement serves them: not one request fails.
func TestReusePortKilledWorkerQueue(t *testing.T) {
	t.Parallel()
	die := filepath.Join(t.TempDir(), "die")
	// A slow start keeps the slot without a worker long enough for a
	// queue to build up.
	f := startFromFile(t, appFile{workers: 3, mode: "reuseport", env: map[string]string{
		"HELPER_DIE_FILE": die, "HELPER_START_DELAY": "300ms"}})
	stop := make(chan struct{})
	ld := startLoad(f.addr, 32, 1<<40, stop)
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		ld.wg.Wait()
	}()
	testsync.WaitFor(t, 30*time.Second, "load under way", func() bool { return ld.ok.Load() > 100 })
	from := len(f.rec.events)
	writeFile(t, die, "")
	dead := f.rec.wait(t, &from, 20*time.Second, "a worker killed by SIGKILL", func(e Event) bool {
		return e.Kind == WorkerExited && e.Signal == syscall.SIGKILL
	})
	// Connections pile up in the dead worker's socket.
	queued := 0
	testsync.WaitFor(t, 10*time.Second, "connections queued in the dead worker's socket", func() bool {
		sock := f.slots[dead.Worker][0]
		info, err := unix.GetsockoptTCPInfo(int(sock.Fd()), unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			l, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", sock.Fd()))
			t.Fatalf("slot %d socket fd %d (%s): %v", dead.Worker, sock.Fd(), l, err)
		}
		queued = max(queued, int(info.Unacked)) // a listener's accept queue length
		return queued > 0
	})
	f.rec.wait(t, &from, 20*time.Second, "the replacement ready", func(e Event) bool {
		return e.Kind == WorkerReady && e.Worker == dead.Worker
	})
	before := ld.ok.Load()
	testsync.WaitFor(t, 30*time.Second, "load after the replacement", func() bool { return ld.ok.Load() > before+300 })
	close(stop)
	ld.wg.Wait()
	t.Logf("worker %d (pid %d) killed; %d connections queued in its socket at most; load: %d ok, %d errors, %d non-2xx",
		dead.Worker, dead.PID, queued, ld.ok.Load(), ld.errs.Load(), ld.non2xx.Load())
	if ld.errs.Load() != 0 || ld.non2xx.Load() != 0 {
		t.Errorf("%d connection errors (first: %v), %d non-2xx; want 0 and 0", ld.errs.Load(), ld.firstErr, ld.non2xx.Load())
	}
	// The queue was served by the replacement, not lost with the worker.
	testsync.WaitFor(t, 10*time.Second, "the dead worker's queue to drain", func() bool {
		info, _ := unix.GetsockoptTCPInfo(int(f.slots[dead.Worker][0].Fd()), unix.IPPROTO_TCP, unix.TCP_INFO)
		return info != nil && info.Unacked == 0
	})
}

// TestReusePortWorkerCount: the sockets decide the worker count. A file
// that asks for fewer workers than there are socket sets gets one per set,
// with a warning; reload keeps the count and scale is refused, both
// saying how to change it.
func TestReusePortWorkerCount(t *testing.T) {
	t.Parallel()
	a := appFile{workers: 3, mode: "reuseport"}
	f := startFromFile(t, a)
	a.workers = 2
	f.rewrite(t, a)
	if _, err := f.call(t, 30*time.Second, control.Request{Cmd: control.CmdReload}); err != nil {
		t.Fatalf("reload: %v", err)
	}
	st := f.status(t)
	if len(st.Workers) != 3 || st.Generation != 2 {
		t.Errorf("after a reload to workers = 2: %d workers of generation %d; want 3 of generation 2", len(st.Workers), st.Generation)
	}
	if log := f.logs.String(); !strings.Contains(log, "workers changed to 2, but reuseport mode runs one worker per socket set, and there are 3: keeping 3 workers") {
		t.Errorf("no warning about the worker count in:\n%s", log)
	}
	_, err := f.call(t, 5*time.Second, control.Request{Cmd: control.CmdScale, Workers: 4})
	if err == nil || !strings.Contains(err.Error(), "scale refused: reuseport mode runs one worker per socket set, and there are 3") {
		t.Errorf("scale to 4: %v; want a refusal", err)
	}

	// At start: 2 sets for an app that asks for 3 workers.
	app := testApp(t, 3, nil)
	app.Mode = appfile.ModeReusePort
	slots, err := sockets.BindSlots(app, 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, set := range slots {
			set[0].Close()
		}
	})
	logs := &testsync.Buffer{}
	rec, _ := startRun(t, Options{App: app, SlotListeners: slots, Stderr: logs})
	rec.waitNotify(t, 20*time.Second, "READY=1")
	if n := rec.count(WorkerStarted); n != 2 {
		t.Errorf("%d workers started for 2 socket sets; want 2", n)
	}
	if !strings.Contains(logs.String(), "workers = 3 means 3 workers here, but there are 2 reuseport socket sets: running 2") {
		t.Errorf("no warning about the worker count in:\n%s", logs)
	}
}

// TestReusePortGroupOrder records why reuseport mode does not steer
// connections to the worker on the receiving CPU with a classic BPF
// program (docs/config.md, Modes): such a program picks a socket by its
// index in the kernel's reuseport group, and that index is the order in
// which the sockets started listening (not bound), reshuffled when one
// closes (the last moves into its place). Under systemd the listen order
// is the order in which socket units happened to start. If a kernel ever
// changes this, the reasoning in the docs must be revisited.
func TestReusePortGroupOrder(t *testing.T) {
	open := map[int]bool{} // closed at the end unless closed before
	t.Cleanup(func() {
		for fd := range open {
			unix.Close(fd)
		}
	})
	socket := func(port int) int {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		open[fd] = true
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			t.Fatal(err)
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			t.Fatal(err)
		}
		return fd
	}
	listen := func(fd int) {
		if err := unix.Listen(fd, 16); err != nil {
			t.Fatal(err)
		}
	}
	// order steers one connection to each group index in turn (a program
	// that returns the constant k) and says which socket received it.
	order := func(port int, socks map[string]int) string {
		var got []string
		for k := range len(socks) {
			prog := []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: uint32(k)}}
			for _, fd := range socks {
				if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &unix.SockFprog{Len: 1, Filter: &prog[0]}); err != nil {
					t.Fatal(err)
				}
				break // the program belongs to the group
			}
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			who := "?"
			testsync.WaitFor(t, 5*time.Second, fmt.Sprintf("the connection steered to index %d", k), func() bool {
				for name, fd := range socks {
					if nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC); err == nil {
						unix.Close(nfd)
						who = name
						return true
					}
				}
				return false
			})
			c.Close()
			got = append(got, who)
		}
		return strings.Join(got, ",")
	}

	a := socket(0)
	sa, err := unix.Getsockname(a)
	if err != nil {
		t.Fatal(err)
	}
	port := sa.(*unix.SockaddrInet4).Port
	b, c := socket(port), socket(port)
	// Bound a, b, c; listening c, a, b.
	listen(c)
	listen(a)
	listen(b)
	if got := order(port, map[string]int{"a": a, "b": b, "c": c}); got != "c,a,b" {
		t.Errorf("group order %s; want c,a,b (listen order)", got)
	}
	unix.Close(c)
	delete(open, c)
	d := socket(port)
	listen(d)
	if got := order(port, map[string]int{"a": a, "b": b, "d": d}); got != "b,a,d" {
		t.Errorf("after closing c and adding d: group order %s; want b,a,d (the last moved into c's place)", got)
	}
}
