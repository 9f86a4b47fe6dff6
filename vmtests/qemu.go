package vmtests

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/vmtests/internal/vmagent"
)

// The QEMU backend boots a release's VM image (vmimage.go) under TCG (no
// KVM needed) with a Debian kernel, systemd as PID 1 and a pure cgroup2
// hierarchy with every controller, which this project's hybrid
// development host cannot give a container. The VM is a *Container like
// an nspawn one: Exec and everything built on it go to the guest agent
// (package vmagent) over QEMU's user-mode network forward on 127.0.0.1;
// WriteFile, CopyFile and Share go through the same host share, mounted
// read-only in the guest over 9p.

// Guest resources and bounds.
const (
	vmCPUs         = 2
	vmMemoryMiB    = 1536
	vmBootAttempts = 2               // boots of a fresh guest before BootVM fails (see BootVM)
	vmBootTimeout  = 8 * time.Minute // TCG on a 2-core host: measured 28 s on a quieter host, 3 min 47 s at load 27
	vmForwards     = 16              // guest ports forwarded from the host (Listen)
	guestPortFirst = 8001
)

// qemuTools are the host commands the QEMU backend adds to hostTools.
var qemuTools = map[string]string{
	"qemu-system-x86_64": "qemu-system-x86",
	"mkfs.ext4":          "e2fsprogs",
}

var (
	qemuOnce sync.Once
	qemuErr  error
)

// prepareQEMU installs qemu-system-x86 and e2fsprogs with apt, once per
// process, when they are missing, and says whether they are there now.
// TestQEMU's requireQEMU turns an error into testtool.Missing (a skip on a
// laptop, a failure under CI); BootVM fails.
func prepareQEMU(logf func(string, ...any)) error {
	qemuOnce.Do(func() { qemuErr = installTools(qemuTools, logf) })
	return qemuErr
}

// vmTransport is how a VM's Container reaches its guest.
type vmTransport struct {
	agent string // host address of the agent's forward
	token string

	mu       sync.Mutex
	forwards []Endpoint // guest ports forwarded from the host
	used     int
}

// Endpoint is an address for a server in a container: Listen is what the
// server binds inside, Dial what the host connects to.
type Endpoint struct {
	Listen string // e.g. "127.0.0.1:8080" (nspawn) or "10.0.2.15:8001" (VM)
	Dial   string // always on the host's 127.0.0.1
}

// Listen returns a fresh address for a server in c that the host (Load,
// LoadBackground) reaches. An nspawn container shares the host's network,
// so both are one FreePort; a VM's guest port is one of the ports QEMU
// forwards from the host's 127.0.0.1.
func (c *Container) Listen(t testing.TB) Endpoint {
	t.Helper()
	if c.vm == nil {
		a := fmt.Sprintf("127.0.0.1:%d", FreePort(t))
		return Endpoint{Listen: a, Dial: a}
	}
	c.vm.mu.Lock()
	defer c.vm.mu.Unlock()
	if c.vm.used == len(c.vm.forwards) {
		t.Fatalf("%s: all %d forwarded ports are taken (raise vmForwards)", c.Name, len(c.vm.forwards))
	}
	e := c.vm.forwards[c.vm.used]
	c.vm.used++
	return e
}

// BootVM boots a fresh QEMU guest of release r and waits until its
// systemd reports the system running ("degraded" is accepted and the
// failed units logged). t.Cleanup stops QEMU by pid (SIGTERM, then
// SIGKILL) and removes its cgroup whatever happens to the test.
func BootVM(t testing.TB, r Release) *Container {
	t.Helper()
	Require(t)
	if err := prepareQEMU(t.Logf); err != nil {
		t.Fatalf("boot VM %s: %v", r.Name, err)
	}
	img := VMImage(t, r)
	agent, err := buildAgent()
	if err != nil {
		t.Fatalf("build the guest agent: %v", err)
	}
	share := t.TempDir()
	logs := t.TempDir()
	if err := os.Chmod(share, 0o755); err != nil {
		t.Fatalf("boot VM %s: %v", r.Name, err)
	}
	tok := make([]byte, 32)
	if _, err := rand.Read(tok); err != nil {
		t.Fatalf("boot VM %s: token: %v", r.Name, err)
	}
	vm := &vmTransport{token: hex.EncodeToString(tok)}
	if err := os.WriteFile(filepath.Join(share, agentTokenFile), []byte(vm.token), 0o600); err != nil {
		t.Fatalf("boot VM %s: %v", r.Name, err)
	}
	if err := copyFile(agent, filepath.Join(share, agentBinary), 0o755); err != nil {
		t.Fatalf("boot VM %s: %v", r.Name, err)
	}
	name := fmt.Sprintf("%s%d-%d-vm-%s", cgroupPrefix, os.Getpid(), containerSeq.Add(1), r.Name)
	c := &Container{
		Release: r, Name: name, t: t,
		exited:   make(chan struct{}),
		share:    share,
		console:  filepath.Join(logs, "console.log"),
		vm:       vm,
		initComm: "systemd", // the guest's PID 1; diagnose asks its journal
	}
	cg, err := newCgroupSet(name)
	if err != nil {
		t.Fatalf("boot %s: %v", name, err)
	}
	c.cg = cg
	t.Cleanup(c.cleanup)

	qlog := filepath.Join(logs, "qemu.log")
	var start time.Time
	var state string
	for attempt := 1; ; attempt++ {
		start = time.Now()
		if err := c.startQEMU(img, qlog); err != nil {
			t.Fatalf("boot %s: %v", name, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), vmBootTimeout)
		state, err = c.waitRunning(ctx)
		cancel()
		if err == nil {
			break
		}
		q, _ := os.ReadFile(qlog)
		msg := fmt.Sprintf("boot %s: %v\nqemu: %s\nconsole:\n%s", name, err, tail(string(q), 10), c.consoleTail(60))
		if attempt == vmBootAttempts {
			t.Fatal(msg)
		}
		// The emulator, not cohort: in CI a guest kernel died at boot
		// once (an Oops under multi-threaded TCG) and once a guest did
		// not mount its 9p share. A fresh guest from the same image
		// boots; two failures in a row fail the test.
		t.Logf("%s\n%s: the guest did not boot (attempt %d of %d); booting a fresh one", msg, name, attempt, vmBootAttempts)
		c.poweroff(t)
	}
	c.BootTime = time.Since(start)
	t.Logf("%s: booted to %q in %v (qemu pid %d)", name, state, c.BootTime.Round(time.Millisecond), c.cmd.Process.Pid)
	if state == "degraded" {
		t.Logf("%s: failed units:\n%s", name, c.Exec(t, "systemctl", "--failed", "--no-legend").Stdout)
	}
	return c
}

// startQEMU starts QEMU with fresh host ports for the forwards and
// returns once it listens on them. A port FreePort found free may be taken
// again before QEMU binds it (by anyone on the host); QEMU then exits at
// once with "Could not set up host forwarding rule", and startQEMU tries
// again with new ports, three times at most.
func (c *Container) startQEMU(img vmImage, qlog string) error {
	for attempt := 1; ; attempt++ {
		ports, err := freePorts(1 + vmForwards)
		if err != nil {
			return err
		}
		vm := c.vm
		vm.agent = fmt.Sprintf("127.0.0.1:%d", ports[0])
		vm.forwards = nil
		fwd := []string{fmt.Sprintf("hostfwd=tcp:127.0.0.1:%d-%s:%d", ports[0], guestIP, guestAgentPort)}
		for i, hp := range ports[1:] {
			gp := guestPortFirst + i
			vm.forwards = append(vm.forwards, Endpoint{Listen: fmt.Sprintf("%s:%d", guestIP, gp), Dial: fmt.Sprintf("127.0.0.1:%d", hp)})
			fwd = append(fwd, fmt.Sprintf("hostfwd=tcp:127.0.0.1:%d-%s:%d", hp, guestIP, gp))
		}
		out, err := os.Create(qlog)
		if err != nil {
			return err
		}
		c.exited = make(chan struct{})
		c.cmd = cgroupCommand(context.Background(), c.cg, "qemu-system-x86_64", qemuArgs(c.Name, img, c.share, c.console, fwd)...)
		c.cmd.Stdout = out
		c.cmd.Stderr = out
		// If the test binary dies without cleanups, QEMU dies with it (and
		// the next run's sweepStaleCgroups removes its cgroup).
		c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		err = c.cmd.Start()
		out.Close()
		if err != nil {
			return fmt.Errorf("start qemu: %w", err)
		}
		exited := c.exited
		cmd := c.cmd
		go func() {
			_ = cmd.Wait()
			close(exited)
		}()
		// QEMU binds every forward before the guest runs: once the agent's
		// port accepts a connection, all of them are QEMU's.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err = poll(ctx, func() error {
			select {
			case <-exited:
				return nil
			default:
			}
			conn, err := net.DialTimeout("tcp", vm.agent, time.Second)
			if err != nil {
				return err
			}
			conn.Close()
			return nil
		})
		cancel()
		select {
		case <-exited:
			q, _ := os.ReadFile(qlog)
			if strings.Contains(string(q), "Could not set up host forwarding rule") && attempt < 3 {
				continue
			}
			return fmt.Errorf("qemu exited at start: %v\n%s", cmd.ProcessState, tail(string(q), 10))
		default:
		}
		if err != nil {
			return fmt.Errorf("qemu does not listen on %s: %w", vm.agent, err)
		}
		return nil
	}
}

// freePorts returns n distinct ports on 127.0.0.1 that are free right
// now: each found while the others are still held, so that none repeats.
func freePorts(n int) ([]int, error) {
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find free ports: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// qemuArgs is the QEMU command line: TCG, no default devices, the kernel
// booted directly, an x86-64-v2 CPU, the disk with snapshot=on (the cached image is never
// written), user networking restricted to the forwards (the guest reaches
// nothing outside), the share over 9p, the serial console into a file.
func qemuArgs(name string, img vmImage, share, console string, forwards []string) []string {
	return []string{
		"-name", name,
		"-nodefaults", "-no-user-config",
		// One host thread for both vCPUs: with multi-threaded TCG the
		// trixie kernel once died at boot in CI ("Oops: int3" in
		// sched_clock_cpu, a static key being patched while the other
		// vCPU ran it: cross-modifying code that MTTCG does not
		// serialise). Single-threaded TCG cannot race there; on a 2-CPU
		// host running two VMs it costs little (boots of 31 s and 44 s).
		"-accel", "tcg,thread=single",
		// x86-64-v2 (SSE4.2, POPCNT), which every Debian binary runs on, and
		// no AVX, which TCG would have to emulate for glibc's string
		// functions. (Chosen, not measured against "max".)
		"-cpu", "Nehalem",
		"-smp", strconv.Itoa(vmCPUs),
		"-m", strconv.Itoa(vmMemoryMiB),
		"-display", "none",
		"-monitor", "none",
		"-no-reboot", // with panic=-1: a guest panic ends QEMU, not a reboot loop
		"-serial", "file:" + console,
		"-kernel", img.kernel,
		"-initrd", img.initrd,
		"-append", "root=/dev/vda rw console=ttyS0 quiet mitigations=off panic=-1 net.ifnames=0 systemd.unified_cgroup_hierarchy=1",
		"-drive", "file=" + img.disk + ",if=virtio,format=raw,snapshot=on,cache=unsafe",
		"-netdev", "user,id=net0,restrict=on," + strings.Join(forwards, ","),
		"-device", "virtio-net-pci,netdev=net0",
		"-device", "virtio-rng-pci", // entropy early, for systemd-random-seed and the kernel's CRNG
		"-virtfs", "local,path=" + share + ",mount_tag=" + shareTag + ",security_model=none,readonly=on",
	}
}

// exec runs args in the guest through the agent, with the environment a
// container's commands get.
func (v *vmTransport) exec(ctx context.Context, name string, args []string) (Result, error) {
	resp, err := vmagent.Call(ctx, v.agent, vmagent.Request{Token: v.token, Args: args, Env: hostEnv()})
	res := Result{Stdout: string(resp.Stdout), Stderr: string(resp.Stderr), Code: resp.Code}
	if resp.Truncated {
		res.Stderr += fmt.Sprintf("\n[vmtests: output beyond %d bytes dropped by the agent]", vmagent.MaxOutput)
	}
	if err != nil {
		return res, fmt.Errorf("exec %q in %s: %w", strings.Join(args, " "), name, err)
	}
	return res, nil
}

var (
	agentOnce sync.Once
	agentPath string
	agentErr  error
)

// buildAgent builds the guest agent (static, so it runs on any release)
// once per test process into the cache.
func buildAgent() (string, error) {
	agentOnce.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			agentErr = err
			return
		}
		cache, err := CacheDir()
		if err != nil {
			agentErr = err
			return
		}
		dir := filepath.Join(cache, "build")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			agentErr = fmt.Errorf("create build dir: %w", err)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		// Built under a name of this process's, then renamed: another test
		// process may be copying the previous build.
		out := filepath.Join(dir, "cohort-vmtest-agent")
		tmp := fmt.Sprintf("%s.tmp-%d", out, os.Getpid())
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", tmp, "./vmtests/internal/vmagent/agent")
		cmd.Dir = root
		cmd.Env = append(append(hostEnv(), goEnv()...), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			agentErr = fmt.Errorf("go build agent: %w\n%s", err, tail(string(b), 20))
			return
		}
		if err := os.Rename(tmp, out); err != nil {
			agentErr = fmt.Errorf("install agent build: %w", err)
			return
		}
		agentPath = out
	})
	return agentPath, agentErr
}

func copyFile(src, dst string, mode os.FileMode) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return nil
}
