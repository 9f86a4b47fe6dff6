// Package control is the dispatcher's control socket: a unix stream socket
// in the app's runtime directory that speaks JSON lines, one request and
// one reply per line. `cohort status`, `cohort scale` and the service's
// ExecReload= use it.
//
//	→ {"cmd":"status"}
//	← {"ok":true,"status":{"app":"web","generation":1,…}}
//	→ {"cmd":"scale","workers":8}
//	← {"ok":false,"error":"…"}
//
// Only root and the user the dispatcher runs as may connect (checked with
// SO_PEERCRED on every connection, whatever the socket file's mode says).
// A malformed or oversized request gets an error reply; it never takes the
// dispatcher down.
package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Commands.
const (
	CmdStatus        = "status"
	CmdReload        = "reload"
	CmdScale         = "scale"
	CmdRestartWorker = "restart-worker"
)

// MaxRequest is the longest request line accepted, newline included.
const MaxRequest = 4096

// SocketName is the control socket's file name in the runtime directory.
const SocketName = "control.sock"

// Request is one line a client sends.
type Request struct {
	Cmd     string `json:"cmd"`
	Workers int    `json:"workers,omitempty"` // scale
	Worker  *int   `json:"worker,omitempty"`  // restart-worker
}

// Reply is the line the server answers with.
type Reply struct {
	OK     bool    `json:"ok"`
	Error  string  `json:"error,omitempty"`
	Status *Status `json:"status,omitempty"`
}

// Status is the dispatcher's view of its app.
type Status struct {
	App        string    `json:"app"`
	Mode       string    `json:"mode"`
	Generation int       `json:"generation"`
	State      string    `json:"state"` // "starting", "ready", "reloading", "stopping"
	Line       string    `json:"line"`  // the STATUS= line systemd shows
	Since      time.Time `json:"since"` // when the dispatcher started
	// ConfigError is the app file's first problem while it does not
	// validate (the dispatcher runs the last configuration that did).
	ConfigError string   `json:"config_error,omitempty"`
	Workers     []Worker `json:"workers"`
}

// Worker is one worker slot's current process.
type Worker struct {
	Index      int       `json:"index"`
	PID        int       `json:"pid"` // 0 while waiting to restart
	Generation int       `json:"generation"`
	State      string    `json:"state"` // "starting", "ready", "draining", "exited", "backoff"
	Started    time.Time `json:"started"`
	Restarts   int       `json:"restarts"`
	Handed     uint64    `json:"handed"` // round-robin: connections passed to it
	Active     int       `json:"active"` // round-robin: passed and not yet closed
	RSS        int64     `json:"rss_bytes"`
	CPUPercent float64   `json:"cpu_percent"`      // since the worker started
	Status     string    `json:"status,omitempty"` // the worker's own STATUS=
}

// Handler carries out requests. The server calls it from one goroutine per
// connection, so implementations serialize as they need. Reload returns
// when the reload has finished, with an error when it failed.
type Handler interface {
	Status(ctx context.Context) (*Status, error)
	Reload(ctx context.Context) error
	Scale(ctx context.Context, workers int) error
	RestartWorker(ctx context.Context, index int) error
}

// ParseRequest decodes and checks one request line (without its newline).
func ParseRequest(line []byte) (Request, error) {
	var r Request
	if len(line) > MaxRequest {
		return r, fmt.Errorf("request longer than %d bytes", MaxRequest)
	}
	if err := json.Unmarshal(line, &r); err != nil {
		return r, fmt.Errorf("malformed request: %v", err)
	}
	switch r.Cmd {
	case CmdStatus, CmdReload:
	case CmdScale:
		if r.Workers < 1 || r.Workers > 1024 {
			return r, fmt.Errorf("scale: workers must be 1..1024, got %d", r.Workers)
		}
	case CmdRestartWorker:
		if r.Worker == nil || *r.Worker < 0 {
			return r, errors.New("restart-worker: needs \"worker\": the index of a worker")
		}
	case "":
		return r, errors.New("request has no \"cmd\"")
	default:
		return r, fmt.Errorf("unknown command %q (known: status, reload, scale, restart-worker)", r.Cmd)
	}
	return r, nil
}
