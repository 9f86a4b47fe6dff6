// Command peakrss runs a command and writes the command's own peak RSS
// and CPU time to a file, for tests that bound them.
//
//	peakrss FILE COMMAND [ARGS…]
//
// A test cannot read them from its own child: the kernel's maxrss of a
// process is raised at exec to the RSS of the memory it had until then,
// which for a child forked by a test process is the test process's (tens
// of MB under -race, whatever the child does). This small program is that
// child; the command it runs inherits only its few MB. FILE gets
// "MAXRSS_BYTES CPU_NANOSECONDS"; the exit status is the command's.
package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: peakrss FILE COMMAND [ARGS…]")
		os.Exit(2)
	}
	cmd := exec.Command(os.Args[2], os.Args[3:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	// A test that kills this process on a timeout kills the command too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		fmt.Fprintf(os.Stderr, "peakrss: %v\n", err)
		os.Exit(2)
	}
	ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if !ok {
		fmt.Fprintln(os.Stderr, "peakrss: no rusage")
		os.Exit(2)
	}
	line := fmt.Sprintf("%d %d\n", ru.Maxrss*1024, ru.Utime.Nano()+ru.Stime.Nano()) // Maxrss is in kilobytes on Linux
	if err := os.WriteFile(os.Args[1], []byte(line), 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "peakrss: %v\n", err)
		os.Exit(2)
	}
	os.Exit(cmd.ProcessState.ExitCode())
}
