package main

import (
	"context"
	"fmt"
	"runtime/debug"
)

// version is set at link time (-X main.version=…, from git describe).
var version = ""

func cmdVersion(ctx context.Context, env *environment, args []string) int {
	fmt.Fprintf(env.stdout, "cohort %s\n", versionString())
	return 0
}

// versionString prefers the linked-in version and falls back to the module
// version that `go install …@vX` records.
func versionString() string {
	if version != "" {
		return version
	}
	if info, ok := debug.ReadBuildInfo(); ok && info.Main.Version != "" {
		return info.Main.Version
	}
	return "(devel)"
}
