package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/generator/running"
)

// cmdDispatchReload is the generated service's ExecReload=: `cohort
// dispatch-reload FILE`. It asks the running dispatcher over its control
// socket to do a rolling reload and waits for the result, so that
// `systemctl reload APP` returns when the reload has finished and fails
// when it failed. It must not go through systemd (as `cohort reload`
// does): systemd runs it as part of a reload job, which would wait for
// itself.
//
// It runs as root (ExecReload=+) and validates FILE first: a broken file
// fails the reload with its file:line:col errors, and the old workers keep
// serving untouched. A valid file is recorded as the candidate running
// configuration (package running), which the dispatcher reloads from,
// and becomes the running configuration when the reload succeeded; a
// failed reload leaves the old one.
//
// The socket is $RUNTIME_DIRECTORY/control.sock, which systemd sets for
// ExecReload= as for ExecStart=; else /run/cohort/APP/control.sock. The
// control socket admits root and the service's user.
func cmdDispatchReload(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "dispatch-reload", "[--socket PATH] [--timeout D] FILE",
		"Reload a running dispatcher and wait for the result. The generated service's\n"+
			"ExecReload= runs this; people use 'systemctl reload APP' or 'cohort reload APP'.")
	socket := fs.String("socket", "", "the control socket (default $RUNTIME_DIRECTORY/control.sock, else /run/cohort/APP/control.sock)")
	timeout := fs.Duration("timeout", time.Hour, "give up waiting after this long (systemd's own reload timeout is TimeoutStartSec=)")
	dir := fs.String("running-dir", running.Dir, "where running configurations are recorded")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	file := fs.Arg(0)
	name := appfile.AppName(file)
	if err := appfile.CheckAppName(name); err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch-reload: %s: %v\n", file, err)
		return 2
	}
	data, _, err := running.ReadApp(file)
	if err != nil {
		fmt.Fprintln(env.stderr, err)
		fmt.Fprintf(env.stderr, "cohort dispatch-reload: reload refused: %s is broken; the workers keep running as they were\n", file)
		return 1
	}
	if err := running.WriteCandidate(*dir, name, data); err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch-reload: %v\n", err)
		return 1
	}
	path := *socket
	if path == "" {
		if rd, _, _ := strings.Cut(os.Getenv("RUNTIME_DIRECTORY"), ":"); rd != "" {
			path = filepath.Join(rd, control.SocketName)
		} else {
			path = control.SocketPath(appfile.AppName(fs.Arg(0)))
		}
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	start := time.Now()
	if _, err := control.Call(ctx, path, control.Request{Cmd: control.CmdReload}); err != nil {
		fmt.Fprintf(env.stderr, "cohort dispatch-reload: %v\n", err)
		if err := running.Discard(*dir, name); err != nil {
			fmt.Fprintf(env.stderr, "cohort dispatch-reload: %v\n", err)
		}
		return 1
	}
	if err := running.Promote(*dir, name); err != nil {
		// The workers run the new configuration, so the reload did
		// succeed; only the record of it is missing, which matters
		// for a later broken file and restart.
		fmt.Fprintf(env.stderr, "cohort dispatch-reload: reloaded, but %v\n", err)
	}
	fmt.Fprintf(env.stdout, "reloaded in %s\n", time.Since(start).Round(time.Millisecond))
	return 0
}
