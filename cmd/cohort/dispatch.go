package main

import (
	"context"
	"fmt"
)

// cmdDispatch is replaced by the dispatcher work (issue: dispatcher).
func cmdDispatch(ctx context.Context, env *environment, args []string) int {
	fmt.Fprintln(env.stderr, "cohort dispatch: not implemented yet")
	return 1
}
