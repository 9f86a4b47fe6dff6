// Command cohort-generator is the systemd generator for cohort apps. systemd
// runs it at boot and on every `systemctl daemon-reload` as
//
//	cohort-generator NORMAL_DIR EARLY_DIR LATE_DIR
//
// and it writes <app>.socket and <app>.service for every app file on the
// search path (/etc/cohort, /run/cohort, /usr/lib/cohort) into NORMAL_DIR.
// A bad app file is reported in the kernel log or the journal (systemd gives
// generators no stderr; see log.go) and on stderr, and skipped; the exit
// status is 1 when any file was skipped. See cohort-generator(8).
//
// A bad app file of an app that runs is rendered from the app's running
// configuration (/run/cohort-running/<app>.toml, see package running)
// instead, and the journal says "…; keeping the running configuration of
// APP".
//
// For tests, COHORT_SEARCH_PATH and COHORT_UNIT_DIRS (colon-separated)
// replace the app search path and the unit directories checked for clashes,
// COHORT_RUNNING_DIR the directory of the running configurations, and
// COHORT_GENERATOR_LOG=stderr keeps the report off the system's logs.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/generator"
	"github.com/cohort-dev/cohort/generator/running"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) != 1 && len(args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: cohort-generator NORMAL_DIR [EARLY_DIR LATE_DIR]")
		return 2
	}
	log := newSystemLog(os.Stderr, os.Getenv("COHORT_GENERATOR_LOG") == "stderr")
	// Which systemd the units are for: DelegateSubgroup= only from 254.
	// Unknown (not run by systemd, /proc/1/exe not readable) renders
	// what every version takes.
	version, err := generator.RunningSystemd(context.Background(), 2*time.Second)
	if err != nil {
		version = 0
	}
	g := &generator.Generator{
		SearchPath: pathList("COHORT_SEARCH_PATH", appfile.SearchPath()),
		Options: generator.Options{
			UnitDirs:       pathList("COHORT_UNIT_DIRS", generator.UnitDirs()),
			RunningDir:     envOr("COHORT_RUNNING_DIR", running.Dir),
			SystemdVersion: version,
		},
		Log: log,
	}
	if err := g.Run(args[0]); err != nil {
		fmt.Fprintf(log, "cohort-generator: %v\n", err)
		return 1
	}
	return 0
}

func pathList(env string, def []string) []string {
	if v, ok := os.LookupEnv(env); ok {
		return filepath.SplitList(v)
	}
	return def
}

func envOr(env, def string) string {
	if v, ok := os.LookupEnv(env); ok {
		return v
	}
	return def
}
