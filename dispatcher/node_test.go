package dispatcher

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/sockets"
	"github.com/cohort-dev/cohort/internal/testnpm"
	"github.com/cohort-dev/cohort/internal/testsync"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// TestNodeUnchanged: Express's app.listen(PORT) in shared mode and
// Fastify's listen({port}) in reuseport mode, both from npm and
// unchanged, serve from 2 workers on the socket cohort passed (the
// preload module, packaging/node-preload.js), and a rolling reload under
// load fails no request. Without the module (node_preload = false) the
// same program binds the port itself, which the dispatcher's socket
// holds: EADDRINUSE, no worker ever ready.
func TestNodeUnchanged(t *testing.T) {
	node := testtool.System(t, "node")
	modules := testnpm.Modules(t, testnpm.Express, testnpm.Fastify)
	for _, c := range []struct{ app, mode string }{{"express", "shared"}, {"fastify", "reuseport"}} {
		t.Run(c.app, func(t *testing.T) {
			t.Parallel()
			f := startNode(t, node, modules, c.app, c.mode, true)
			answer := regexp.MustCompile(`^` + c.app + ` worker (\d) pid \d+ gen (\d+)\n$`)
			seen := map[string]bool{}
			testsync.WaitFor(t, 30*time.Second, "both workers to answer", func() bool {
				for range 8 {
					if m := answer.FindStringSubmatch(httpGet(f.addr)); m != nil {
						seen[m[1]] = true
					}
				}
				return len(seen) == 2
			})
			testsync.WaitFor(t, 30*time.Second, "2 ready workers", func() bool {
				return strings.HasPrefix(f.status(t).Line, "2/2 workers ready")
			})
			if log := f.logs.String(); !strings.Contains(log, c.app+".0 | "+c.app+" listening on") {
				t.Errorf("no listening line of worker 0:\n%s", log)
			}

			// A reload under load: 4 clients, a new connection per request.
			var ok, failed atomic.Int64
			var firstErr atomic.Value
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
			for range 4 {
				wg.Go(func() {
					for ctx.Err() == nil {
						resp, err := client.Get("http://" + f.addr + "/")
						if err == nil {
							io.Copy(io.Discard, resp.Body)
							resp.Body.Close()
							if resp.StatusCode != 200 {
								err = fmt.Errorf("status %d", resp.StatusCode)
							}
						}
						if err != nil {
							failed.Add(1)
							firstErr.CompareAndSwap(nil, err.Error())
						} else {
							ok.Add(1)
						}
					}
				})
			}
			testsync.WaitFor(t, 20*time.Second, "load running", func() bool { return ok.Load() > 20 })
			_, err := f.call(t, 2*time.Minute, control.Request{Cmd: control.CmdReload})
			before := ok.Load()
			testsync.WaitFor(t, 20*time.Second, "load after the reload", func() bool { return ok.Load() > before+20 })
			cancel()
			wg.Wait()
			if err != nil {
				t.Fatalf("reload: %v", err)
			}
			t.Logf("%s %s: reload under load: %d ok, %d failed", c.app, c.mode, ok.Load(), failed.Load())
			if failed.Load() != 0 {
				t.Errorf("%d requests failed during the reload (first: %v)", failed.Load(), firstErr.Load())
			}
			st := f.status(t)
			for _, w := range st.Workers {
				if w.Generation != 2 || w.State != "ready" {
					t.Errorf("after the reload: %+v", w)
				}
			}
		})
	}
	t.Run("off", func(t *testing.T) {
		t.Parallel()
		f := startNode(t, node, modules, "express", "shared", false)
		testsync.WaitFor(t, 30*time.Second, "EADDRINUSE", func() bool {
			return strings.Contains(f.logs.String(), "EADDRINUSE")
		})
		if st := f.status(t); strings.HasPrefix(st.Line, "2/2 workers ready") {
			t.Errorf("node_preload = false: %s", st.Line)
		}
	})
}

// startNode runs testdata/node/APP.js under an in-process dispatcher in
// mode with 2 workers, PORT the port of its socket, NODE_PATH the npm
// packages, and the repository's preload module.
func startNode(t *testing.T, node, modules, app, mode string, preload bool) *reloadFixture {
	t.Helper()
	root := repoRoot(t)
	dir := t.TempDir()
	logs := &testsync.Buffer{}
	opt := Options{RuntimeDir: t.TempDir(), Stdout: logs, Stderr: logs, NodePreload: filepath.Join(root, "packaging", "node-preload.js")}
	var addr string
	if mode == "reuseport" {
		a := appfile.New("n")
		a.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
		var err error
		if opt.SlotListeners, err = sockets.BindSlots(a, 2); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			for _, set := range opt.SlotListeners {
				for _, f := range set {
					f.Close()
				}
			}
		})
		addr = sockets.BoundAddr(opt.SlotListeners[0][0])
	} else {
		var l *os.File
		l, addr = tcpListener(t, "http")
		opt.Listeners = []*os.File{l}
	}
	_, port, _ := net.SplitHostPort(addr)
	file := filepath.Join(dir, app+".toml")
	writeFile(t, file, fmt.Sprintf(`command = [%q, %q]
workers = 2
mode = %q
node_preload = %v
ready_timeout = "30s"
stop_timeout = "10s"
[environment]
PORT = %q
NODE_PATH = %q
[[listen]]
name = "http"
address = %q
`, node, filepath.Join(root, "dispatcher", "testdata", "node", app+".js"), mode, preload, port, modules, addr))
	a, err := appfile.ParseFile(file)
	if err != nil {
		t.Fatal(err)
	}
	opt.App = a
	rec, stop := startRun(t, opt)
	f := &reloadFixture{file: file, sock: filepath.Join(opt.RuntimeDir, control.SocketName), addr: addr, rec: rec, stop: stop,
		logs: opt.Stderr.(*testsync.Buffer), slots: opt.SlotListeners}
	testsync.WaitFor(t, 10*time.Second, "the control socket", func() bool {
		_, err := os.Stat(f.sock)
		return err == nil
	})
	return f
}

// httpGet is one request on a new connection; "" on any error.
func httpGet(addr string) string {
	body, err := get("http://" + addr + "/")
	if err != nil {
		return ""
	}
	return body
}
