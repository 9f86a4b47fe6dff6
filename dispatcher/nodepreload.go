package dispatcher

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cohort-dev/cohort/appfile"
)

// Node programs unchanged (node_preload in cohort.toml(5)): the workers'
// NODE_OPTIONS get --require of the preload module the .deb installs
// (packaging/node-preload.js), and every worker of a socket mode gets
// COHORT_LISTEN_PORTS, the port of each fd it is passed, which the module
// matches listen() calls against. The module does the rest in the
// worker; the dispatcher only names the file and the ports.

// DefaultNodePreload is where the .deb installs the preload module.
const DefaultNodePreload = "/usr/share/cohort/node-preload.js"

// ListenPortsEnv names, for a worker of shared or reuseport mode, the
// TCP port of each fd it is passed, in LISTEN_FDS order, space-separated,
// "-" for a socket that is not TCP.
const ListenPortsEnv = "COHORT_LISTEN_PORTS"

// nodePreloadEnv adds the preload module to env's NODE_OPTIONS when app
// wants it (app.NodePreload) and its mode passes listening sockets
// (round-robin mode passes a channel, which the module cannot use). The
// module is file, or DefaultNodePreload; when it is not there, warnf
// says so once per generation and the workers start without it.
func nodePreloadEnv(app *appfile.App, env []string, file string, warnf func(string, ...any)) []string {
	if !app.NodePreload || app.Mode == appfile.ModeRoundRobin {
		return env
	}
	if file == "" {
		file = DefaultNodePreload
	}
	if st, err := os.Stat(file); err != nil || !st.Mode().IsRegular() {
		warnf("node_preload: the preload module %s is not there (%v); node workers start without it and must listen({fd: 3}) themselves", file, err)
		return env
	}
	// NODE_OPTIONS takes a double-quoted value with \" and \\ escapes.
	opt := `--require "` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(file) + `"`
	if old := envValue(env, "NODE_OPTIONS"); old != "" {
		opt += " " + old
	}
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if !strings.HasPrefix(kv, "NODE_OPTIONS=") {
			out = append(out, kv)
		}
	}
	return append(out, "NODE_OPTIONS="+opt)
}

// listenPorts is the ListenPortsEnv value for fds.
func listenPorts(fds []uintptr) (string, error) {
	ports := make([]string, len(fds))
	for i, fd := range fds {
		sa, err := unix.Getsockname(int(fd))
		if err != nil {
			return "", fmt.Errorf("getsockname of listener fd %d: %w", fd, err)
		}
		switch a := sa.(type) {
		case *unix.SockaddrInet4:
			ports[i] = strconv.Itoa(a.Port)
		case *unix.SockaddrInet6:
			ports[i] = strconv.Itoa(a.Port)
		default:
			ports[i] = "-"
		}
	}
	return strings.Join(ports, " "), nil
}
