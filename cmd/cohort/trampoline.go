package main

import (
	"os"

	"github.com/cohort-dev/cohort/dispatcher"
)

// The dispatcher starts each worker as `/proc/self/exe __exec-worker …`:
// this process then becomes the worker's program (dispatcher.Trampoline)
// before main runs, so nothing of the CLI — flags, signal handling — is
// set up in a process that is about to exec.
func init() {
	if len(os.Args) > 1 && os.Args[1] == dispatcher.TrampolineArg {
		os.Exit(dispatcher.Trampoline(os.Args[2:]))
	}
}
