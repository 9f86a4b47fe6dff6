package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/generator/config"
)

// cmdDispatchReload is the generated service's ExecReload=: `cohort
// dispatch-reload FILE`. It asks the running dispatcher over its control
// socket to do a rolling reload and waits for the result, so that
// `systemctl reload APP` returns when the reload has finished and fails
// when it failed. It must not go through systemd (as `cohort reload`
// does): systemd runs it as part of a reload job, which would wait for
// itself.
//
// The socket is $RUNTIME_DIRECTORY/control.sock, which systemd sets for
// ExecReload= as for ExecStart=; else /run/cohort/APP/control.sock. It
// runs as the service's user (DynamicUser= included), which the control
// socket admits.
func cmdDispatchReload(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "dispatch-reload", "[--socket PATH] [--timeout D] FILE",
		"Reload a running dispatcher and wait for the result. The generated service's\n"+
			"ExecReload= runs this; people use 'systemctl reload APP' or 'cohort reload APP'.")
	socket := fs.String("socket", "", "the control socket (default $RUNTIME_DIRECTORY/control.sock, else /run/cohort/APP/control.sock)")
	timeout := fs.Duration("timeout", time.Hour, "give up waiting after this long (systemd's own reload timeout is TimeoutStartSec=)")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	path := *socket
	if path == "" {
		if rd, _, _ := strings.Cut(os.Getenv("RUNTIME_DIRECTORY"), ":"); rd != "" {
			path = filepath.Join(rd, control.SocketName)
		} else {
			path = control.SocketPath(config.AppName(fs.Arg(0)))
		}
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	start := time.Now()
	if _, err := control.Call(ctx, path, control.Request{Cmd: control.CmdReload}); err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch-reload: %v\n", err)
		return 1
	}
	fmt.Fprintf(env.stdout, "reloaded in %s\n", time.Since(start).Round(time.Millisecond))
	return 0
}
