package dispatcher

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"golang.org/x/sys/unix"
)

// fakeJournald is a datagram socket that decodes the native journal
// protocol, as journald does, memfds included.
type fakeJournald struct {
	path    string
	entries chan map[string]string
	conn    *net.UnixConn
	done    chan struct{}
}

func startFakeJournald(t *testing.T) *fakeJournald {
	t.Helper()
	path := filepath.Join(t.TempDir(), "journal.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadBuffer(4 << 20)
	j := &fakeJournald{path: path, entries: make(chan map[string]string, 4096), conn: conn, done: make(chan struct{})}
	go func() {
		defer close(j.done)
		buf := make([]byte, 1<<20)
		oob := make([]byte, unix.CmsgSpace(4))
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			data := append([]byte(nil), buf[:n]...)
			if oobn > 0 {
				data, err = readMemfd(oob[:oobn])
				if err != nil {
					t.Errorf("fake journald: %v", err)
					continue
				}
			}
			e, err := parseNative(data)
			if err == nil && len(e) == 0 {
				err = errors.New("empty entry")
			}
			if err != nil {
				t.Errorf("fake journald: %v", err)
				continue
			}
			select {
			case j.entries <- e:
			default:
			}
		}
	}()
	t.Cleanup(func() { conn.Close(); <-j.done })
	return j
}

// readMemfd reads the entry of a memfd passed with SCM_RIGHTS, checking
// that it was sealed as journald requires.
func readMemfd(oob []byte) ([]byte, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil || len(msgs) != 1 {
		return nil, errors.New("bad control message")
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return nil, errors.New("bad SCM_RIGHTS")
	}
	f := os.NewFile(uintptr(fds[0]), "memfd")
	defer f.Close()
	seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
	if err != nil || seals&unix.F_SEAL_WRITE == 0 {
		return nil, errors.New("memfd not sealed")
	}
	// The sender's writes left the shared offset at the end: read from 0,
	// as journald (which maps the file) does.
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return nil, err
	}
	return b, nil
}

// parseNative decodes one native-protocol entry.
func parseNative(b []byte) (map[string]string, error) {
	e := map[string]string{}
	for len(b) > 0 {
		nl := bytes.IndexByte(b, '\n')
		if nl < 0 {
			return nil, errors.New("field without newline")
		}
		line := b[:nl]
		if k, v, ok := bytes.Cut(line, []byte{'='}); ok {
			e[string(k)] = string(v)
			b = b[nl+1:]
			continue
		}
		rest := b[nl+1:]
		if len(rest) < 8 {
			return nil, errors.New("short binary field")
		}
		n := binary.LittleEndian.Uint64(rest)
		if uint64(len(rest)-8) < n+1 || rest[8+n] != '\n' {
			return nil, errors.New("bad binary field length")
		}
		e[string(line)] = string(rest[8 : 8+n])
		b = rest[9+n:]
	}
	return e, nil
}

// TestJournalAttribution: each worker's lines reach journald as entries
// with COHORT_APP, COHORT_WORKER, COHORT_PID and COHORT_GENERATION of
// the worker that wrote them; "<N>" prefixes set PRIORITY; a 300 KB line
// (more than a datagram) arrives whole through a memfd; a last line
// without a newline and the lines of a worker that then died by SIGKILL
// are not lost.
func TestJournalAttribution(t *testing.T) {
	t.Parallel()
	j := startFakeJournald(t)
	const long = 300 << 10
	app := testApp(t, 2, map[string]string{
		"COHORT_TEST_HELPER": "printer",
		"HELPER_LINES":       "<3>an error|plain line|<7>debug detail|with\ttab",
		"HELPER_LONG":        strconv.Itoa(long),
		"HELPER_TAIL":        "last words",
		"HELPER_EXIT":        "kill",
	})
	app.Restart = appfile.Restart{Initial: time.Minute, Max: time.Minute, MinUptime: time.Hour}
	l, _ := tcpListener(t, "http")
	stdout := &syncBuffer{}
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}, Journal: true, JournalSocket: j.path, Stdout: stdout})
	var from int
	pids := map[string]string{}
	for range 2 {
		e := rec.wait(t, &from, 10*time.Second, "worker start", func(e Event) bool { return e.Kind == WorkerStarted })
		pids[strconv.Itoa(e.Worker)] = strconv.Itoa(e.PID)
	}
	type key struct{ worker, msg string }
	got := map[key]map[string]string{}
	want := []string{"an error", "plain line", "debug detail", "with\ttab", "long", "last words"}
	deadline := time.After(15 * time.Second)
	for len(got) < 2*len(want) {
		select {
		case e := <-j.entries:
			msg := e["MESSAGE"]
			if len(msg) == long {
				if strings.Trim(msg[:long-1], "x") != "" || msg[long-1] != 'y' {
					t.Errorf("long line mangled")
				}
				msg = "long"
			}
			got[key{e["COHORT_WORKER"], msg}] = e
		case <-deadline:
			var keys []string
			for k := range got {
				keys = append(keys, k.worker+":"+k.msg)
			}
			t.Fatalf("entries after 15s: %q, want %d; stdout (fallback): %q", keys, 2*len(want), stdout.String())
		}
	}
	prio := map[string]string{"an error": "3", "debug detail": "7"}
	for w, pid := range pids {
		for _, m := range want {
			e, ok := got[key{w, m}]
			if !ok {
				t.Errorf("worker %s: no entry %q", w, m)
				continue
			}
			p := prio[m]
			if p == "" {
				p = "6"
			}
			if e["COHORT_APP"] != "t" || e["COHORT_PID"] != pid || e["COHORT_GENERATION"] != "1" || e["PRIORITY"] != p || e["SYSLOG_IDENTIFIER"] != "t."+w+"/"+pid || e["SYSLOG_PID"] != pid {
				delete(e, "MESSAGE")
				t.Errorf("worker %s (pid %s), %q: fields %v, want priority %s", w, pid, m, e, p)
			}
		}
	}
	if stdout.String() != "" {
		t.Errorf("lines fell back to stdout: %q", stdout.String())
	}
}

// TestJournalUnreachable: when journald cannot be reached, lines go to
// stdout with their "[app.N]" prefix rather than being lost.
func TestJournalUnreachable(t *testing.T) {
	t.Parallel()
	app := testApp(t, 1, map[string]string{"COHORT_TEST_HELPER": "printer", "HELPER_LINES": "hello", "HELPER_EXIT": "0"})
	app.Restart = appfile.Restart{Initial: time.Minute, Max: time.Minute, MinUptime: time.Hour}
	l, _ := tcpListener(t, "http")
	stdout := &syncBuffer{}
	startRun(t, Options{App: app, Listeners: []*os.File{l}, Journal: true, JournalSocket: filepath.Join(t.TempDir(), "none"), Stdout: stdout})
	waitFor(t, 10*time.Second, "the fallback line", func() bool { return strings.Contains(stdout.String(), "[t.0] hello\n") })
}

// TestCopyLinesSplit: a line longer than maxLine is passed on in
// maxLine pieces, and a last line without a newline is passed on.
func TestCopyLinesSplit(t *testing.T) {
	t.Parallel()
	var out syncBuffer
	o := newOutput("a", &out, io.Discard, false)
	in := strings.Repeat("z", 2*maxLine+maxLine/2) + "\nsecond\n\nno newline"
	o.copyLines(workerTag{index: 3}, io.NopCloser(strings.NewReader(in)))
	o.close()
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	var lens []int
	for _, l := range lines {
		lens = append(lens, len(strings.TrimPrefix(l, "[a.3] ")))
	}
	want := []int{maxLine, maxLine, maxLine / 2, len("second"), 0, len("no newline")}
	if fmt.Sprint(lens) != fmt.Sprint(want) {
		t.Errorf("line lengths %v, want %v", lens, want)
	}
}
