package generator

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// MinDelegateSubgroup is the first systemd with DelegateSubgroup=
// (systemd.resource-control(5), "Added in version 254"); an older one
// warns about the unknown key in the journal and in
// `systemd-analyze verify`.
const MinDelegateSubgroup = 254

// RunningSystemd is the version of the systemd that runs as PID 1, read
// from its own binary: `/proc/1/exe --version` ("systemd 257
// (257.13-1~deb13u1)"). A generator runs under the systemd it generates
// for, at boot and at every daemon-reload, and /proc/1/exe is what that
// systemd runs even when a package upgrade has replaced the file on disk
// and no daemon-reexec followed; `systemctl --version` or the
// libsystemd-shared-NNN.so on disk would name the new one. The command
// is bounded by timeout and its output to 4 KiB.
func RunningSystemd(ctx context.Context, timeout time.Duration) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/proc/1/exe", "--version")
	var out limited
	cmd.Stdout = &out
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("/proc/1/exe --version: %w", err)
	}
	return ParseSystemdVersion(out.String())
}

// ParseSystemdVersion reads the version from `systemd --version`'s first
// line, "systemd 257 (257.13-1~deb13u1)".
func ParseSystemdVersion(s string) (int, error) {
	first, _, _ := strings.Cut(s, "\n")
	f := strings.Fields(first)
	if len(f) >= 2 && f[0] == "systemd" {
		if v, err := strconv.Atoi(f[1]); err == nil && v > 0 && v < 100000 {
			return v, nil
		}
	}
	return 0, fmt.Errorf("not a systemd version: %q", first)
}

// limited keeps the first 4 KiB written to it and drops the rest.
type limited struct{ bytes.Buffer }

func (l *limited) Write(p []byte) (int, error) {
	if room := 4096 - l.Len(); room > 0 {
		l.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}
