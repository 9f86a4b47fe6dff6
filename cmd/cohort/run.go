package main

import (
	"context"
	"fmt"
)

// cmdRun is replaced by the dispatcher work (issue: dispatcher).
func cmdRun(ctx context.Context, env *environment, args []string) int {
	fmt.Fprintln(env.stderr, "cohort run: not implemented yet")
	return 1
}
