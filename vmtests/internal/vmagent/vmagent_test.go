package vmagent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const testToken = "0123456789abcdef-test-token"

// startAgent serves on a 127.0.0.1 port until the test ends and returns
// the address.
func startAgent(t *testing.T, requestTime time.Duration) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	s := &Server{Token: testToken, Logf: t.Logf, RequestTime: requestTime}
	go func() { done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Errorf("Serve did not return after its context ended")
		}
	})
	return l.Addr().String()
}

func call(t *testing.T, addr string, args ...string) (Response, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return Call(ctx, addr, Request{Token: testToken, Args: args, Env: []string{"PATH=/usr/bin:/bin", "X=y z"}})
}

func TestRoundTrip(t *testing.T) {
	addr := startAgent(t, 0)
	resp, err := call(t, addr, "/bin/sh", "-c", `printf 'out\0bin'; echo "err $X" >&2; exit 7`)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Code != 7 || string(resp.Stdout) != "out\x00bin" || string(resp.Stderr) != "err y z\n" || resp.Truncated {
		t.Errorf("got %+v; want exit 7, stdout with its NUL kept, stderr with the env", resp)
	}
	// A killed command: -1, as the nspawn transport reports it.
	resp, err = call(t, addr, "/bin/sh", "-c", `kill -9 $$`)
	if err != nil || resp.Code != -1 {
		t.Errorf("self-killed command: %+v, %v; want code -1, no error", resp, err)
	}
}

// A request without the token runs nothing.
func TestBadTokenRunsNothing(t *testing.T) {
	addr := startAgent(t, 0)
	marker := filepath.Join(t.TempDir(), "ran")
	for _, tok := range []string{"", "wrong", testToken[:len(testToken)-1], testToken + "x"} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := Call(ctx, addr, Request{Token: tok, Args: []string{"/usr/bin/touch", marker}})
		cancel()
		if !errors.Is(err, ErrAgent) || !strings.Contains(err.Error(), "bad token") {
			t.Errorf("token %q: err %v; want a bad-token refusal", tok, err)
		}
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("a request with a wrong token ran its command")
	}
	// And an agent without a token refuses everything, even an empty token.
	s := &Server{}
	if err := (&Request{Args: []string{"/bin/true"}}).validate(s.Token); err == nil {
		t.Error("an agent with no token accepted a request")
	}
}

// Hostile input: garbage, an oversized request, a client that sends
// nothing, NUL bytes: each is answered (or the connection closed) within
// bounds and runs nothing.
func TestHostileInput(t *testing.T) {
	addr := startAgent(t, 500*time.Millisecond)
	raw := func(t *testing.T, send []byte) Response {
		t.Helper()
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
		if len(send) > 0 {
			// The agent may stop reading early and close; a failed write
			// is then expected.
			_, _ = conn.Write(send)
		}
		b, err := io.ReadAll(io.LimitReader(conn, 1<<20))
		if err != nil && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("read answer: %v", err)
		}
		var resp Response
		if err := json.Unmarshal(b, &resp); err != nil {
			t.Fatalf("answer %q is not a response: %v", b, err)
		}
		return resp
	}
	cases := map[string][]byte{
		"garbage":   []byte("\x00\xff{{{not json\n"),
		"wrongtype": []byte(`{"token": 5, "args": "sh"}` + "\n"),
		"oversized": append([]byte(`{"token":"`+testToken+`","args":["/bin/true","`), bytes.Repeat([]byte("a"), MaxRequest+10)...),
		"silent":    nil,
		"partial":   []byte(`{"token":"` + testToken + `","args":["/bin/tr`),
		"nul":       []byte(`{"token":"` + testToken + `","args":["/bin/true","a\u0000b"]}` + "\n"),
		"noargs":    []byte(`{"token":"` + testToken + `","args":[]}` + "\n"),
		"manyargs":  []byte(`{"token":"` + testToken + `","args":["/bin/true"` + strings.Repeat(`,"x"`, MaxArgs) + `]}` + "\n"),
	}
	for name, send := range cases {
		t.Run(name, func(t *testing.T) {
			start := time.Now()
			resp := raw(t, send)
			if resp.Error == "" || resp.Code != -1 {
				t.Errorf("answer %+v; want a refusal", resp)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("refusal took %v", d)
			}
			t.Logf("refused in %v: %s", time.Since(start).Round(time.Millisecond), resp.Error)
		})
	}
}

// Closing the connection (the host's context ended) kills the command's
// whole process group in the guest.
func TestCancelKillsCommand(t *testing.T) {
	addr := startAgent(t, 0)
	pidFile := filepath.Join(t.TempDir(), "pid")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := Call(ctx, addr, Request{Token: testToken, Args: []string{"/bin/sh", "-c", `sleep 300 & echo $! > ` + pidFile + `; wait`}})
		done <- err
	}()
	var pid int
	deadline := time.Now().Add(20 * time.Second)
	for pid == 0 && time.Now().Before(deadline) {
		if b, err := os.ReadFile(pidFile); err == nil && strings.HasSuffix(string(b), "\n") {
			pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if pid == 0 {
		cancel()
		t.Fatal("the command did not start within 20 s")
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Call after cancel: %v; want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Call did not return after its context ended")
	}
	for time.Now().Before(deadline) {
		if syscall.Kill(pid, 0) != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	t.Fatalf("the command's child (pid %d) survived the client's cancel", pid)
}

// Output beyond MaxOutput is dropped and said so; the answer stays bounded.
func TestOutputCapped(t *testing.T) {
	addr := startAgent(t, 0)
	resp, err := call(t, addr, "/bin/sh", "-c", "head -c "+strconv.Itoa(MaxOutput+4096)+" /dev/zero")
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Stdout) != MaxOutput || !resp.Truncated || resp.Code != 0 {
		t.Errorf("stdout %d bytes, truncated %v, code %d; want %d, true, 0", len(resp.Stdout), resp.Truncated, resp.Code, MaxOutput)
	}
}

// A missing command is an agent error, not an exit status.
func TestMissingCommand(t *testing.T) {
	addr := startAgent(t, 0)
	_, err := call(t, addr, "/nonexistent/cmd")
	if !errors.Is(err, ErrAgent) {
		t.Errorf("err %v; want ErrAgent", err)
	}
}

func TestReadToken(t *testing.T) {
	dir := t.TempDir()
	short := filepath.Join(dir, "short")
	_ = os.WriteFile(short, []byte("abc"), 0o600)
	if _, err := ReadToken(short); err == nil {
		t.Error("a 3-byte token was accepted")
	}
	big := filepath.Join(dir, "big")
	_ = os.WriteFile(big, bytes.Repeat([]byte("t"), 10000), 0o600)
	if _, err := ReadToken(big); err == nil {
		t.Error("a 10000-byte token was accepted")
	}
	good := filepath.Join(dir, "good")
	_ = os.WriteFile(good, []byte(testToken), 0o600)
	if tok, err := ReadToken(good); err != nil || tok != testToken {
		t.Errorf("ReadToken = %q, %v; want the file's content", tok, err)
	}
}
