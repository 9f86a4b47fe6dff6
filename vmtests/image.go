package vmtests

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Image is a container image built from a Containerfile by BuildImage:
// its root directory and what its instructions said about running it.
type Image struct {
	Release    Release
	Dir        string   // the root: an overlay of the release's cached root
	Env        []string // ENV, as NAME=value
	User       string   // USER, "" for root
	Entrypoint []string
	Cmd        []string
	StopSignal string   // STOPSIGNAL, "" for SIGTERM
	Expose     []string // EXPOSE, as written
}

// buildTimeout bounds one RUN instruction.
const buildTimeout = 10 * time.Minute

// BuildImage runs the Containerfile at file the way `podman build` would,
// with contextDir as the build context and args as the --build-arg values:
// FROM is the cached root of release r (any Debian base image is taken
// for it: the roots are minbase with systemd, python3, curl), seen
// through an overlay in a temporary directory so that the cache is never
// written; COPY copies files of the context into it; RUN runs /bin/sh -c
// under systemd-nspawn (as PID 1, with the host's network, as a build
// does); ARG, ENV, USER, EXPOSE, STOPSIGNAL, ENTRYPOINT and CMD are
// recorded. Any other instruction fails t, so that a Containerfile this
// cannot run is noticed rather than half built. The overlay is unmounted
// at cleanup.
func BuildImage(t testing.TB, r Release, file, contextDir string, args map[string]string) *Image {
	t.Helper()
	Require(t)
	steps, err := ParseContainerfile(file)
	if err != nil {
		t.Fatal(err)
	}
	img := &Image{Release: r, Dir: overlayRoot(t, Root(t, r))}
	vars := map[string]string{}
	for _, in := range steps {
		where := fmt.Sprintf("%s:%d: %s", file, in.Line, in.Keyword)
		fail := func(err error) { t.Fatalf("%s: %v", where, err) }
		switch in.Keyword {
		case "FROM":
			if !strings.HasPrefix(in.Args, "debian:") {
				fail(fmt.Errorf("%q: want a Debian base image, which the cached %s root stands for", in.Args, r.Name))
			}
			t.Logf("%s %s: the cached %s root", where, in.Args, r.Name)
		case "ARG":
			name, def, hasDef := strings.Cut(in.Args, "=")
			if v, ok := args[name]; ok {
				vars[name] = v
			} else if hasDef {
				vars[name] = def
			}
		case "ENV":
			for _, kv := range strings.Fields(in.Args) {
				name, v, ok := strings.Cut(kv, "=")
				if !ok || strings.ContainsAny(v, `"'`) {
					fail(fmt.Errorf("%q: only NAME=value pairs without quotes are supported", in.Args))
				}
				if v, err = expand(v, vars); err != nil {
					fail(err)
				}
				vars[name] = v
				img.Env = append(img.Env, name+"="+v)
			}
		case "COPY":
			f, err := expand(in.Args, vars)
			if err != nil {
				fail(err)
			}
			parts := strings.Fields(f)
			if len(parts) != 2 || strings.HasPrefix(parts[0], "--") {
				fail(fmt.Errorf("%q: want COPY SRC DST (one file, no options)", f))
			}
			if err := copyIn(contextDir, parts[0], img.Dir, parts[1]); err != nil {
				fail(err)
			}
		case "RUN":
			if strings.HasPrefix(in.Args, "[") || strings.HasPrefix(in.Args, "--") {
				fail(errors.New("only the shell form without options is supported"))
			}
			ctx, cancel := contextWithTimeout(buildTimeout)
			out, err := nspawn(ctx, img, "build", "/bin/sh", "-c", in.Args)
			cancel()
			if err != nil {
				fail(fmt.Errorf("%w\n%s", err, tail(out, 40)))
			}
		case "USER":
			if img.User, err = expand(in.Args, vars); err != nil {
				fail(err)
			}
		case "EXPOSE":
			img.Expose = append(img.Expose, strings.Fields(in.Args)...)
		case "STOPSIGNAL":
			img.StopSignal = in.Args
		case "ENTRYPOINT":
			if img.Entrypoint, err = in.ExecForm(); err != nil {
				fail(err)
			}
		case "CMD":
			if img.Cmd, err = in.ExecForm(); err != nil {
				fail(err)
			}
		default:
			fail(errors.New("not supported by vmtests.BuildImage"))
		}
	}
	if len(img.Entrypoint)+len(img.Cmd) == 0 {
		t.Fatalf("%s: no ENTRYPOINT or CMD", file)
	}
	return img
}

func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// overlayRoot mounts an overlay with lower as its read-only lower layer
// and an upper layer in a temporary directory, and returns where it is
// mounted; it is unmounted at cleanup, before the directory goes.
func overlayRoot(t testing.TB, lower string) string {
	t.Helper()
	tmp := t.TempDir()
	upper, work, merged := filepath.Join(tmp, "upper"), filepath.Join(tmp, "work"), filepath.Join(tmp, "root")
	for _, d := range []string{upper, work, merged} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work)
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		t.Fatalf("mount an overlay of %s: %v", lower, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(merged, 0); err != nil {
			// Something still uses it: detach, so that the temporary
			// directory's removal cannot reach through to a busy mount.
			t.Logf("unmount %s: %v; detaching it", merged, err)
			if err := unix.Unmount(merged, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", merged, err)
			}
		}
	})
	return merged
}

// copyIn copies the file src of the build context to dst in root (into
// dst when dst ends in "/"), as COPY does with one file: mode kept, owner
// root, parents created.
func copyIn(contextDir, src, root, dst string) error {
	if filepath.IsAbs(src) || slices.Contains(strings.Split(src, "/"), "..") {
		return fmt.Errorf("COPY %s: the source must be inside the build context", src)
	}
	if !filepath.IsAbs(dst) {
		return fmt.Errorf("COPY %s %s: want an absolute destination (no WORKDIR)", src, dst)
	}
	if strings.HasSuffix(dst, "/") {
		dst += filepath.Base(src)
	}
	from := filepath.Join(contextDir, src)
	st, err := os.Stat(from)
	if err != nil {
		return fmt.Errorf("COPY %s: %w", src, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("COPY %s: only regular files are supported", src)
	}
	data, err := os.ReadFile(from)
	if err != nil {
		return fmt.Errorf("COPY %s: %w", src, err)
	}
	to := filepath.Join(root, dst)
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return fmt.Errorf("COPY %s: %w", src, err)
	}
	if err := os.WriteFile(to, data, st.Mode().Perm()); err != nil {
		return fmt.Errorf("COPY %s: %w", src, err)
	}
	return os.Chmod(to, st.Mode().Perm())
}

// nspawn runs argv in img's root under systemd-nspawn (not booted: argv is
// PID 1, with the host's network) in a cgroup subtree of its own that it
// removes after, and returns its output.
func nspawn(ctx context.Context, img *Image, what string, argv ...string) (string, error) {
	name := fmt.Sprintf("%s%d-%d-%s-%s", cgroupPrefix, os.Getpid(), containerSeq.Add(1), img.Release.Name, what)
	cg, err := newCgroupSet(name)
	if err != nil {
		return "", err
	}
	defer cg.remove(context.Background())
	args := nspawnArgs(img, name)
	cmd := cgroupCommand(ctx, cg, "systemd-nspawn", append(append(args, "--"), argv...)...)
	cmd.Env = append(cmd.Env, nspawnEnv...)
	var out strings.Builder
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { cg.kill(); return nil }
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("systemd-nspawn %s: %w", strings.Join(argv, " "), err)
	}
	return out.String(), nil
}

// nspawnEnv is nspawn's own environment for an image: no tmpfs on /tmp
// (systemd-nspawn(1), $SYSTEMD_NSPAWN_TMPFS_TMP), which would hide what
// COPY put there; container runtimes mount none either.
var nspawnEnv = []string{"SYSTEMD_NSPAWN_TMPFS_TMP=0"}

// nspawnArgs are the options every nspawn of img gets: its root, a
// machine name that is also unique for nspawn's own state, no
// registration (no machined on the host) and the launcher's cgroup (see
// cgroup.go), the container's stdio as nspawn's, ENV.
func nspawnArgs(img *Image, name string) []string {
	args := []string{
		"--directory=" + img.Dir,
		"--machine=" + name,
		"--register=no",
		"--keep-unit",
		"--console=pipe",
		"--quiet",
	}
	for _, kv := range img.Env {
		args = append(args, "--setenv="+kv)
	}
	return args
}

// RunImage starts img's ENTRYPOINT and CMD (then extra arguments, which
// replace CMD when there are any) as PID 1 of a container under
// systemd-nspawn without --boot, as its USER, in a network namespace of
// its own (loopback only: reach its ports with c.Exec, like `kubectl
// exec`), in a cgroup subtree of its own, plus the cgroup v1 directories
// in cgroups (a CPU quota, say). PID 1's stdout and stderr go to files
// (Output). nspawn passes SIGTERM on to PID 1 as STOPSIGNAL
// (--kill-signal), so t.Cleanup's power-off is the runtime's stop; c.Wait
// returns the exit status a runtime would see.
func RunImage(t testing.TB, img *Image, cgroups []string, extra ...string) *Container {
	t.Helper()
	argv := append(slices.Clone(img.Entrypoint), img.Cmd...)
	if len(extra) > 0 {
		argv = append(slices.Clone(img.Entrypoint), extra...)
	}
	logs := t.TempDir()
	name := fmt.Sprintf("%s%d-%d-%s-run", cgroupPrefix, os.Getpid(), containerSeq.Add(1), img.Release.Name)
	c := &Container{
		Release: img.Release, Name: name, t: t,
		exited:   make(chan struct{}),
		console:  filepath.Join(logs, "stderr"),
		stdout:   filepath.Join(logs, "stdout"),
		initComm: filepath.Base(argv[0]),
	}
	cg, err := newCgroupSet(name)
	if err != nil {
		t.Fatalf("run %s: %v", name, err)
	}
	c.cg = cg
	t.Cleanup(c.cleanup)
	if c.execCg, err = cg.child("host-exec"); err != nil {
		t.Fatalf("run %s: %v", name, err)
	}
	// The launcher moves itself into the extra cgroups too (cgroupCommand
	// writes its pid into every procs file of the set); they are the
	// caller's to remove.
	launch := &cgroupSet{dirs: append(slices.Clone(cg.dirs), cgroups...)}
	stop := img.StopSignal
	if stop == "" {
		stop = "SIGTERM"
	}
	args := append(nspawnArgs(img, name), "--private-network", "--kill-signal="+stop)
	if img.User != "" {
		args = append(args, "--user="+img.User)
	}
	stdout, err := os.Create(c.stdout)
	if err != nil {
		t.Fatal(err)
	}
	defer stdout.Close() // nspawn has its own copy
	stderr, err := os.Create(c.console)
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	c.cmd = cgroupCommand(context.Background(), launch, "systemd-nspawn", append(append(args, "--"), argv...)...)
	c.cmd.Env = append(c.cmd.Env, nspawnEnv...)
	c.cmd.Stdout, c.cmd.Stderr = stdout, stderr
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("run %s: start nspawn: %v", name, err)
	}
	go func() {
		_ = c.cmd.Wait()
		close(c.exited)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	if err := c.waitInit(ctx); err != nil {
		t.Fatalf("run %s: %v\nstderr:\n%s", name, err, c.consoleTail(40))
	}
	t.Logf("%s: %s is PID 1 (host pid %d)", name, strings.Join(argv, " "), c.InitPID)
	return c
}

// Output is what the PID 1 of a RunImage container wrote so far.
func (c *Container) Output() (stdout, stderr string) {
	return readString(c.stdout), readString(c.console)
}

// Wait waits at most timeout for the container to end and returns
// nspawn's exit status, which is its PID 1's (128+N for a signal N); t
// fails when it does not end.
func (c *Container) Wait(t testing.TB, timeout time.Duration) int {
	t.Helper()
	select {
	case <-c.exited:
	case <-time.After(timeout):
		t.Fatalf("%s: still running after %s", c.Name, timeout)
	}
	return c.cmd.ProcessState.ExitCode()
}
