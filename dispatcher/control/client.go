package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
)

// SocketPath is where the dispatcher of app listens when systemd runs it:
// in its RuntimeDirectory=, /run/cohort/<app>/.
func SocketPath(app string) string {
	return filepath.Join("/run/cohort", app, SocketName)
}

// Call sends one request to the control socket at path and returns the
// reply. A reply with OK false comes back as an error holding the
// server's message. ctx bounds the whole exchange (a reload can take as
// long as the rolling restart does).
func Call(ctx context.Context, path string, req Request) (*Reply, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to control socket: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	// A server that refuses the peer answers and hangs up at once, maybe
	// before the request is written: then the write fails, but the
	// refusal is waiting to be read, and it says more than EPIPE.
	_, writeErr := conn.Write(append(b, '\n'))
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil && writeErr != nil {
		return nil, fmt.Errorf("send %s request: %w", req.Cmd, writeErr)
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s: %w", req.Cmd, ctx.Err())
		}
		return nil, fmt.Errorf("read %s reply: %w", req.Cmd, err)
	}
	var rep Reply
	if err := json.Unmarshal(line, &rep); err != nil {
		return nil, fmt.Errorf("malformed %s reply: %w", req.Cmd, err)
	}
	if !rep.OK {
		return &rep, errors.New(rep.Error)
	}
	return &rep, nil
}
