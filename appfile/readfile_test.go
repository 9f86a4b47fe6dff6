package appfile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestReadRegularFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.toml")
	if err := os.WriteFile(good, []byte("workers = 2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo.toml")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	zero := filepath.Join(dir, "zero.toml")
	if err := os.Symlink("/dev/zero", zero); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big.toml")
	if err := os.WriteFile(big, []byte(strings.Repeat("#", 101)), 0o644); err != nil {
		t.Fatal(err)
	}
	exact := filepath.Join(dir, "exact.toml")
	if err := os.WriteFile(exact, []byte(strings.Repeat("#", 100)), 0o644); err != nil {
		t.Fatal(err)
	}

	if data, err := ReadRegularFile(good, 100); err != nil || string(data) != "workers = 2\n" {
		t.Errorf("good file: %q, %v", data, err)
	}
	if data, err := ReadRegularFile(exact, 100); err != nil || len(data) != 100 {
		t.Errorf("file of exactly the limit: %d bytes, %v", len(data), err)
	}
	done := make(chan error, 1)
	go func() { _, err := ReadRegularFile(fifo, 100); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), "FIFO") {
			t.Errorf("FIFO: got %v, want ErrNotRegular naming a FIFO", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("FIFO: ReadRegularFile blocked")
	}
	if _, err := ReadRegularFile(zero, 100); !errors.Is(err, ErrNotRegular) {
		t.Errorf("/dev/zero: got %v, want ErrNotRegular", err)
	}
	if _, err := ReadRegularFile(big, 100); err == nil || !strings.Contains(err.Error(), "more than the 100 bytes") {
		t.Errorf("big file: got %v, want a size error", err)
	}
	if _, err := ReadRegularFile(dir, 100); !errors.Is(err, ErrNotRegular) {
		t.Errorf("directory: got %v, want ErrNotRegular", err)
	}
	if _, err := ReadRegularFile(filepath.Join(dir, "missing"), 100); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: got %v, want ErrNotExist", err)
	}
}
