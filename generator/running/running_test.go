package running

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const good = "command = [\"/bin/app\"]\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"

func TestWriteReadPromote(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "running")
	if _, err := Read(dir, "web"); !errors.Is(err, ErrNone) {
		t.Fatalf("Read without a directory: %v, want ErrNone", err)
	}
	// The service's UMask=0027 applies to its "+" commands: the
	// dispatcher (another user) must still read its snapshot.
	old := unix.Umask(0o027)
	err := Write(dir, "web", []byte(good))
	unix.Umask(old)
	if err != nil {
		t.Fatal(err)
	}
	for path, mode := range map[string]os.FileMode{dir: 0o755 | os.ModeDir, Path(dir, "web"): 0o644} {
		if st, err := os.Stat(path); err != nil || st.Mode() != mode {
			t.Errorf("%s: %v %v, want %v", path, st.Mode(), err, mode)
		}
	}
	if b, err := Read(dir, "web"); err != nil || string(b) != good {
		t.Fatalf("Read = %q, %v", b, err)
	}
	app, err := Load(dir, "/etc/cohort/web.toml")
	if err != nil || app.Path != "/etc/cohort/web.toml" || app.Name != "web" {
		t.Fatalf("Load = %+v, %v", app, err)
	}

	next := strings.Replace(good, "8080", "8081", 1)
	if err := WriteCandidate(dir, "web", []byte(next)); err != nil {
		t.Fatal(err)
	}
	if app, err := LoadCandidate(dir, "/etc/cohort/web.toml"); err != nil || app.Listen[0].Address != "127.0.0.1:8081" {
		t.Errorf("LoadCandidate = %+v, %v", app, err)
	}
	if err := Discard(dir, "web"); err != nil {
		t.Fatal(err)
	}
	if app, err := LoadCandidate(dir, "/etc/cohort/web.toml"); err != nil || app.Listen[0].Address != "127.0.0.1:8080" {
		t.Errorf("LoadCandidate after Discard = %+v, %v; want the snapshot", app, err)
	}
	if err := WriteCandidate(dir, "web", []byte(next)); err != nil {
		t.Fatal(err)
	}
	if err := Promote(dir, "web"); err != nil {
		t.Fatal(err)
	}
	if b, _ := Read(dir, "web"); string(b) != next {
		t.Errorf("after Promote: %q", b)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("leftovers in %s: %v", dir, entries)
	}
	if err := Remove(dir, "web"); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(dir, "web"); !errors.Is(err, ErrNone) {
		t.Errorf("Read after Remove: %v", err)
	}
	if err := Remove(dir, "web"); err != nil {
		t.Errorf("Remove twice: %v", err)
	}
}

// TestUntrusted: a snapshot that someone else may have written is never
// used; the generator would render root's units from it.
func TestUntrusted(t *testing.T) {
	dir := t.TempDir()
	if err := Write(dir, "web", []byte(good)); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(Path(dir, "web"), 0o666); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(dir, "web"); err == nil || errors.Is(err, ErrNone) || !strings.Contains(err.Error(), "writable by group or others") {
		t.Errorf("world-writable snapshot: %v", err)
	}
	os.Chmod(Path(dir, "web"), 0o644)
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(dir, "web"); err == nil || errors.Is(err, ErrNone) {
		t.Errorf("world-writable directory: %v", err)
	}
	if err := Write(dir, "web", []byte(good)); err == nil {
		t.Error("wrote into a world-writable directory")
	}
	os.Chmod(dir, 0o755)

	// A symlink in place of the snapshot is not followed.
	other := filepath.Join(t.TempDir(), "x.toml")
	os.WriteFile(other, []byte(good), 0o644)
	os.Remove(Path(dir, "web"))
	if err := os.Symlink(other, Path(dir, "web")); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(dir, "web"); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("symlinked snapshot: %v", err)
	}
}

// TestReadApp: the bytes returned are the ones validated, and a broken
// file gives its file:line:col errors.
func TestReadApp(t *testing.T) {
	path := filepath.Join(t.TempDir(), "web.toml")
	os.WriteFile(path, []byte(good), 0o644)
	data, app, err := ReadApp(path)
	if err != nil || string(data) != good || app.Path != path {
		t.Fatalf("ReadApp = %q %+v %v", data, app, err)
	}
	os.WriteFile(path, []byte("wokers = 2\n"), 0o644)
	if _, _, err := ReadApp(path); err == nil || !strings.HasPrefix(err.Error(), path+":1:1: unknown key \"wokers\"") {
		t.Errorf("broken: %v", err)
	}
	msg := KeepMessage(func() error { _, _, err := ReadApp(path); return err }(), "web")
	if !strings.HasPrefix(msg, path+`:1:1: unknown key "wokers" (did you mean "workers"?)`) || !strings.HasSuffix(msg, "; keeping the running configuration of web") || strings.Contains(msg, "\n") {
		t.Errorf("KeepMessage = %q", msg)
	}
}
