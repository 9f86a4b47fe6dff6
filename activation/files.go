package activation

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// The environment variables of the socket activation protocol
// (sd_listen_fds(3)) and of cohort's round-robin mode.
const (
	envPID   = "LISTEN_PID"
	envFDs   = "LISTEN_FDS"
	envNames = "LISTEN_FDNAMES"
)

// firstFD is SD_LISTEN_FDS_START: inherited sockets are at fds 3, 4, ...
const firstFD = 3

// UnnamedFD is the name of an inherited socket that LISTEN_FDNAMES does not
// name (or without LISTEN_FDNAMES), as sd_listen_fds_with_names(3) names it.
const UnnamedFD = "unknown"

var (
	// ErrNotActivated is returned by Listen when the process was not
	// socket-activated and no fallback address was given.
	ErrNotActivated = errors.New("not socket-activated (no LISTEN_FDS for this process)")
	// ErrNoListener is wrapped by Listen's error when the process was
	// activated but has no (more) socket with the asked name; the message
	// lists the names that are left.
	ErrNoListener = errors.New("no such listener")
)

// Files is the set of sockets a process inherited. Each socket is handed out
// once, by Listen or File; Close closes the ones nobody took. A Files is
// safe for use by several goroutines.
type Files struct {
	mu        sync.Mutex
	activated bool
	files     []*os.File // inherited, in fd order; nil once handed out
	rrFile    *os.File   // the round-robin channel until first used
	rrNames   []string   // listener names by index (COHORT_RR_LISTENERS)
	rrTaken   []bool
	rrHello   bool   // the dispatcher asked for HELLO (rr.HelloEnv)
	rr        *demux // started by the first round-robin Listen
}

// Inherit takes the sockets passed to this process by systemd or by cohort's
// dispatcher: LISTEN_FDS sockets starting at fd 3, named by LISTEN_FDNAMES,
// if LISTEN_PID is this process's pid. It marks them close-on-exec and
// unsets LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES and COHORT_RR_LISTENERS
// (also when it fails), so child processes do not inherit them.
//
// A process that was not activated (no LISTEN_PID or LISTEN_FDS, or a
// LISTEN_PID of another process) gets a Files on which Listen uses its
// fallback address; that is not an error. Inherit fails only when the
// variables are malformed or a listed fd is not open; the sockets are then
// left alone.
//
// A socket named rr.FDName ("cohort-rr") is cohort's round-robin channel:
// Listen then also serves the names listed in COHORT_RR_LISTENERS.
//
// The environment is consumed by the first call: call Inherit once per
// process (and do not mix it with the package-level Listen).
func Inherit() (*Files, error) {
	pidStr, fdsStr := os.Getenv(envPID), os.Getenv(envFDs)
	namesStr, rrStr := os.Getenv(envNames), os.Getenv(rr.ListenersEnv)
	hello := os.Getenv(rr.HelloEnv) == "1"
	for _, k := range []string{envPID, envFDs, envNames, rr.ListenersEnv, rr.HelloEnv} {
		os.Unsetenv(k)
	}
	if pidStr == "" || fdsStr == "" {
		return &Files{}, nil
	}
	pid, err := strconv.Atoi(pidStr)
	if err != nil {
		return nil, fmt.Errorf("inherit sockets: %s=%q: %w", envPID, pidStr, err)
	}
	if pid != os.Getpid() {
		return &Files{}, nil
	}
	n, err := strconv.Atoi(fdsStr)
	if err != nil || n < 0 || n > 1<<16 {
		return nil, fmt.Errorf("inherit sockets: %s=%q is not a count of fds", envFDs, fdsStr)
	}
	var names []string
	if namesStr != "" {
		names = strings.Split(namesStr, ":")
	}
	for fd := firstFD; fd < firstFD+n; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			return nil, fmt.Errorf("inherit sockets: %s=%d but fd %d: %w", envFDs, n, fd, err)
		}
	}
	fs := &Files{activated: true}
	for i := range n {
		fd := firstFD + i
		unix.CloseOnExec(fd)
		name := UnnamedFD
		if i < len(names) && names[i] != "" {
			name = names[i]
		}
		f := os.NewFile(uintptr(fd), name)
		if name == rr.FDName && fs.rrFile == nil {
			fs.rrFile = f
			continue
		}
		fs.files = append(fs.files, f)
	}
	if fs.rrFile != nil {
		if rrStr == "" {
			fs.Close()
			return nil, fmt.Errorf("inherit sockets: fd %q without %s", rr.FDName, rr.ListenersEnv)
		}
		fs.rrNames = strings.Split(rrStr, ":")
		fs.rrTaken = make([]bool, len(fs.rrNames))
		fs.rrHello = hello
	}
	return fs, nil
}

// Activated reports whether the process was socket-activated.
func (fs *Files) Activated() bool {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.activated
}

// Names returns the names that Listen can still hand out: inherited
// sockets in fd order, then round-robin listeners in index order. A name
// appears once per socket.
func (fs *Files) Names() []string {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.namesLocked()
}

func (fs *Files) namesLocked() []string {
	var names []string
	for _, f := range fs.files {
		if f != nil {
			names = append(names, f.Name())
		}
	}
	for i, name := range fs.rrNames {
		if !fs.rrTaken[i] {
			names = append(names, name)
		}
	}
	return names
}

// Listen returns a listener for the socket named name.
//
//   - Activated, with an inherited listening socket of that name (plain
//     systemd, or cohort's shared mode): that socket. Several sockets with
//     the same name are handed out by successive calls, in fd order.
//   - Activated in cohort's round-robin mode with name in
//     COHORT_RR_LISTENERS: a listener whose Accept returns the connections
//     the dispatcher hands over for that name; its Addr is the name, the
//     connections' LocalAddr is the real one. It returns an error wrapping
//     net.ErrClosed when the dispatcher has gone. Closing every
//     round-robin listener closes the channel to the dispatcher.
//   - Activated, but no socket of that name is left: an error wrapping
//     ErrNoListener that lists the names left. The fallback is not used:
//     an activated service should not quietly bind a port of its own.
//   - Not activated: net.Listen on fallback ("host:port" for TCP, or a
//     path or @abstract name for a unix socket); with an empty fallback, an
//     error wrapping ErrNotActivated.
//
// The caller owns and closes the returned listener. The first Accept on
// any listener from this package sends READY=1 (see Ready).
func (fs *Files) Listen(name, fallback string) (net.Listener, error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if !fs.activated {
		if fallback == "" {
			return nil, fmt.Errorf("listen %q: %w", name, ErrNotActivated)
		}
		network := "tcp"
		if strings.HasPrefix(fallback, "/") || strings.HasPrefix(fallback, "@") || strings.HasPrefix(fallback, "./") {
			network = "unix"
		}
		ln, err := net.Listen(network, fallback)
		if err != nil {
			return nil, fmt.Errorf("listen %q on fallback %s: %w", name, fallback, err)
		}
		return readyListener{ln}, nil
	}
	for i, f := range fs.files {
		if f == nil || f.Name() != name {
			continue
		}
		ln, err := net.FileListener(f)
		if err != nil {
			return nil, fmt.Errorf("listen %q on inherited fd %d: %w", name, firstFD+i, err)
		}
		f.Close() // ln holds its own copy
		fs.files[i] = nil
		return readyListener{ln}, nil
	}
	if i := slices.Index(fs.rrNames, name); i >= 0 && !fs.rrTaken[i] {
		if fs.rr == nil {
			if fs.rrFile == nil {
				return nil, fmt.Errorf("listen %q: round-robin channel: %w", name, net.ErrClosed)
			}
			w, err := rr.NewWorker(fs.rrFile)
			fs.rrFile = nil
			if err != nil {
				return nil, fmt.Errorf("listen %q: %w", name, err)
			}
			if fs.rrHello {
				// The dispatcher gives a worker that has not spoken one
				// connection at a time, and stops one that never speaks.
				if err := w.Hello(); err != nil {
					w.Close()
					return nil, fmt.Errorf("listen %q: %w", name, err)
				}
			}
			fs.rr = newDemux(w, len(fs.rrNames))
		}
		ln, err := fs.rr.listen(i, name)
		if err != nil {
			return nil, fmt.Errorf("listen %q: %w", name, err)
		}
		fs.rrTaken[i] = true
		return ln, nil
	}
	return nil, fmt.Errorf("listen %q: %w (left: %s)", name, ErrNoListener, strings.Join(fs.namesLocked(), ", "))
}

// File hands out the inherited socket named name as a file, for sockets
// that are not stream listeners (for example a UDP socket, for
// net.FilePacketConn). The caller owns and closes it. It returns an error
// wrapping ErrNotActivated or ErrNoListener like Listen.
func (fs *Files) File(name string) (*os.File, error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if !fs.activated {
		return nil, fmt.Errorf("file %q: %w", name, ErrNotActivated)
	}
	for i, f := range fs.files {
		if f != nil && f.Name() == name {
			fs.files[i] = nil
			return f, nil
		}
	}
	return nil, fmt.Errorf("file %q: %w (left: %s)", name, ErrNoListener, strings.Join(fs.namesLocked(), ", "))
}

// TakeAll hands out every inherited socket that Listen or File has not, in
// fd order, each named from LISTEN_FDNAMES ("unknown" when unnamed, as
// sd_listen_fds_with_names(3) names it), for a program that matches them
// itself, like cohort's dispatcher. The round-robin channel is not among
// them. The caller owns and closes the files; a later TakeAll returns
// none. Without activation it returns nil.
func (fs *Files) TakeAll() []*os.File {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	var out []*os.File
	for i, f := range fs.files {
		if f != nil {
			out = append(out, f)
			fs.files[i] = nil
		}
	}
	return out
}

// Close closes every inherited socket that Listen or File did not hand out,
// including an unused round-robin channel. Listeners already handed out
// stay open: their owners close them. It returns the first error.
func (fs *Files) Close() error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	var errs []error
	for i, f := range fs.files {
		if f != nil {
			errs = append(errs, f.Close())
			fs.files[i] = nil
		}
	}
	if fs.rrFile != nil {
		errs = append(errs, fs.rrFile.Close())
		fs.rrFile = nil
	}
	return errors.Join(errs...)
}

var process struct {
	once  sync.Once
	files *Files
	err   error
}

// Listen is Files.Listen on the process's own Files, which the first call
// creates with Inherit. Every call therefore draws from one set: a second
// Listen for a name that had one socket returns ErrNoListener, while
// without activation every call listens on its own fallback. If Inherit
// failed, every call returns its error.
func Listen(name, fallback string) (net.Listener, error) {
	process.once.Do(func() { process.files, process.err = Inherit() })
	if process.err != nil {
		return nil, process.err
	}
	return process.files.Listen(name, fallback)
}

// Environ returns the variables that pass sockets named names, placed at
// fds 3, 4, ... in that order, to a child: LISTEN_FDS and LISTEN_FDNAMES.
// LISTEN_PID must also be the child's pid; see Exec.
func Environ(names ...string) []string {
	return []string{
		envFDs + "=" + strconv.Itoa(len(names)),
		envNames + "=" + strings.Join(names, ":"),
	}
}

// Exec replaces the calling process with the program at path, with argv
// and env plus LISTEN_PID set to the calling process's pid, which the
// program keeps. It is the last step of a small exec shim that a
// dispatcher starts with the sockets at fds 3.. (exec.Cmd.ExtraFiles
// places them there without close-on-exec) and Environ in its environment:
// the only way for a Go parent to give a child its own pid in LISTEN_PID.
// Exec returns only on error.
func Exec(path string, argv, env []string) error {
	env = slices.DeleteFunc(slices.Clone(env), func(kv string) bool { return strings.HasPrefix(kv, envPID+"=") })
	env = append(env, envPID+"="+strconv.Itoa(os.Getpid()))
	if err := syscall.Exec(path, argv, env); err != nil {
		return fmt.Errorf("exec %s: %w", path, err)
	}
	return nil
}
