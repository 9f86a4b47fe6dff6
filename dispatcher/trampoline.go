package dispatcher

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/cohort-dev/cohort/internal/cgroup"
	"github.com/cohort-dev/cohort/internal/cpuset"
	"golang.org/x/sys/unix"
)

// TrampolineArg is argv[1] of a worker before it becomes the app's
// command: the dispatcher starts workers as `SELF __exec-worker …`, and the
// binary that contains the dispatcher must hand such a process to
// Trampoline before doing anything else.
const TrampolineArg = "__exec-worker"

// The trampoline's argv after TrampolineArg:
//
//	STATUS-FD CPU PATH ARGV0 ARGS…
//
// STATUS-FD is a pipe the trampoline marks close-on-exec (-1: none): it
// reads EOF in the dispatcher when exec succeeded, an error text when it
// failed. CPU is the CPU to pin to (-1: none). PATH is the resolved
// command and ARGV0 ARGS… its argv.
const trampolineFixedArgs = 4

// trampolineCgroupEnv, in the trampoline's environment, is the cgroup it
// moves itself into before it execs the command: the worker's own
// (cgroups.go), where the fork could not start it there (clone3 refused,
// as systemd's seccomp filters do). The command never sees it.
const trampolineCgroupEnv = "COHORT_TRAMPOLINE_CGROUP"

// Trampoline turns the current process into a worker: it sets LISTEN_PID,
// WorkerPIDEnv (and WATCHDOG_PID when WATCHDOG_USEC is set) to its own pid, pins itself
// to a CPU when asked, and execs the command. args are the arguments after
// TrampolineArg. It returns only on failure, with the exit code to use
// (127: not found, 126: not executable, 2: bad arguments), after writing
// the reason to stderr and to the status pipe.
func Trampoline(args []string) int {
	if len(args) < trampolineFixedArgs {
		fmt.Fprintf(os.Stderr, "cohort %s: want STATUS-FD CPU PATH ARGV0 [ARGS…], got %q\n", TrampolineArg, args)
		return 2
	}
	statusFD, err1 := strconv.Atoi(args[0])
	cpu, err2 := strconv.Atoi(args[1])
	if err := errors.Join(err1, err2); err != nil {
		fmt.Fprintf(os.Stderr, "cohort %s: %v\n", TrampolineArg, err)
		return 2
	}
	path, argv := args[2], args[3:]
	fail := func(code int, err error) int {
		msg := fmt.Sprintf("cohort: exec %s: %v", path, err)
		fmt.Fprintln(os.Stderr, msg)
		if statusFD >= 0 {
			unix.Write(statusFD, []byte(msg))
		}
		return code
	}
	if statusFD >= 0 {
		unix.CloseOnExec(statusFD)
	}
	// Affinity is per thread and exec keeps the calling thread's: set
	// both on this one.
	runtime.LockOSThread()
	if cpu >= 0 {
		if err := cpuset.Pin(cpu); err != nil {
			return fail(1, err)
		}
	}
	if dir := os.Getenv(trampolineCgroupEnv); dir != "" {
		if err := cgroup.MoveSelf(dir); err != nil {
			return fail(1, err)
		}
	}
	pid := strconv.Itoa(os.Getpid())
	// WorkerPIDEnv first, where the dispatcher looks for it in an
	// orphan's /proc/PID/environ (orphans.go).
	env := []string{WorkerPIDEnv + "=" + pid}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, trampolineCgroupEnv+"=") {
			env = append(env, kv)
		}
	}
	env = append(env, "LISTEN_PID="+pid)
	if os.Getenv("WATCHDOG_USEC") != "" {
		env = append(env, "WATCHDOG_PID="+pid)
	}
	err := unix.Exec(path, argv, env)
	code := 126
	if errors.Is(err, syscall.ENOENT) {
		code = 127
	}
	return fail(code, err)
}
