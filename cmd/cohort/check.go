package main

import "context"

func cmdCheck(ctx context.Context, env *environment, args []string) int { return 1 }

func cmdGenerate(ctx context.Context, env *environment, args []string) int { return 1 }
