package vmtests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A QEMU guest boots a disk image made from the release's cached root
// (root.go) plus what a VM needs and a container does not: a Debian
// kernel and its initramfs (linux-image-amd64 from the mirror the root
// was bootstrapped from), an fstab that mounts the host share over 9p,
// and the unit that starts the guest agent. The root is copied, never
// written: other tests boot it concurrently. The image is a raw ext4 file
// made with `mkfs.ext4 -d`, cached beside the roots, and booted with
// QEMU's snapshot=on, so every VM writes into a throw-away overlay and
// several may boot the same image at once.

// imagePackages are installed into the copy of the root for the VM.
var imagePackages = []string{"linux-image-amd64"}

// imageFormat is bumped whenever the image's build steps change.
const imageFormat = 3

// imageDiskSize is the ext4 file system's size; the file is sparse, and
// the root fills about a fifth of it.
const imageDiskSize = "3G"

// Guest-side constants the image and the harness share.
const (
	guestIP        = "10.0.2.15" // QEMU user networking's default guest address
	guestAgentPort = 7000
	shareTag       = "cohortshare" // the 9p mount tag of the host share
	agentUnit      = "cohort-vmtest-agent.service"
	agentBinary    = "agent"       // in the share
	agentTokenFile = "agent-token" // in the share, 0600 on the host
)

// vmImage is what a guest of one release boots.
type vmImage struct {
	kernel, initrd, disk string
}

func imageStamp(r Release) string {
	return fmt.Sprintf("image-format=%d packages=%s %s", imageFormat, strings.Join(imagePackages, ","), rootStamp(r))
}

// VMImage returns the cached VM image for r, building it (and the root
// it is made from) when missing or stale. t fails when that does not work.
func VMImage(t testing.TB, r Release) vmImage {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	img, err := ensureImage(ctx, r, t.Logf)
	if err != nil {
		t.Fatalf("VM image for %s: %v", r.Name, err)
	}
	return img
}

func imagePaths(dir string) vmImage {
	return vmImage{
		kernel: filepath.Join(dir, "vmlinuz"),
		initrd: filepath.Join(dir, "initrd.img"),
		disk:   filepath.Join(dir, "disk.img"),
	}
}

func imageComplete(dir string, r Release) bool {
	b, err := os.ReadFile(filepath.Join(dir, stampFile))
	return err == nil && string(b) == imageStamp(r)
}

// ensureImage builds the image the way ensureRoot builds a root: under a
// lock, in a temporary directory renamed into place when complete.
func ensureImage(ctx context.Context, r Release, logf func(string, ...any)) (vmImage, error) {
	root, err := ensureRoot(ctx, r, logf)
	if err != nil {
		return vmImage{}, err
	}
	cache, err := CacheDir()
	if err != nil {
		return vmImage{}, err
	}
	final := filepath.Join(cache, "qemu-"+r.Name)
	if imageComplete(final, r) {
		return imagePaths(final), nil
	}
	unlock, err := lockFile(ctx, final+".lock")
	if err != nil {
		return vmImage{}, err
	}
	defer unlock()
	if imageComplete(final, r) {
		return imagePaths(final), nil
	}
	old, _ := filepath.Glob(final + ".tmp-*")
	old2, _ := filepath.Glob(final + ".old-*")
	for _, d := range append(old, old2...) {
		if err := os.RemoveAll(d); err != nil {
			return vmImage{}, fmt.Errorf("remove stale image build: %w", err)
		}
	}
	tmp, err := os.MkdirTemp(cache, "qemu-"+r.Name+".tmp-")
	if err != nil {
		return vmImage{}, fmt.Errorf("create image build dir: %w", err)
	}
	done := false
	defer func() {
		if !done {
			_ = os.RemoveAll(tmp)
		}
	}()
	logf("building the %s VM image from %s (once; cached in %s)", r.Name, root, final)
	start := time.Now()
	if err := buildImage(ctx, root, tmp, r); err != nil {
		return vmImage{}, fmt.Errorf("build %s VM image: %w", r.Name, err)
	}
	if err := os.WriteFile(filepath.Join(tmp, stampFile), []byte(imageStamp(r)), 0o644); err != nil {
		return vmImage{}, fmt.Errorf("build %s VM image: %w", r.Name, err)
	}
	if _, err := os.Stat(final); err == nil {
		trash := fmt.Sprintf("%s.old-%d", final, os.Getpid())
		if err := os.Rename(final, trash); err != nil {
			return vmImage{}, fmt.Errorf("replace stale image: %w", err)
		}
		defer os.RemoveAll(trash)
	}
	if err := os.Rename(tmp, final); err != nil {
		return vmImage{}, fmt.Errorf("install image: %w", err)
	}
	done = true
	logf("built the %s VM image in %v", r.Name, time.Since(start).Round(time.Second))
	return imagePaths(final), nil
}

// buildImage copies root into dir/rootfs, installs the kernel there with
// apt (in a one-shot nspawn container, for /proc, /dev and the host's
// resolv.conf), configures the guest, and makes dir's kernel, initrd and
// disk.img. dir/rootfs is removed at the end.
func buildImage(ctx context.Context, root, dir string, r Release) error {
	fsDir := filepath.Join(dir, "rootfs")
	if _, err := hostRun(ctx, "", "cp", "-a", "--", root, fsDir); err != nil {
		return fmt.Errorf("copy root: %w", err)
	}
	defer os.RemoveAll(fsDir)
	// Only the modules needed to mount the root go into the initramfs (the
	// rest load from the disk): a smaller initramfs boots faster under TCG.
	files := map[string]string{
		"etc/initramfs-tools/conf.d/cohort-vmtest": "MODULES=list\n",
		"etc/initramfs-tools/modules":              "virtio_pci\nvirtio_blk\next4\n",
	}
	for path, data := range files {
		if err := writeInRoot(fsDir, path, data); err != nil {
			return err
		}
	}
	if err := nspawnOnce(ctx, fsDir, "image-"+r.Name,
		"apt-get update -qq && apt-get install -y -qq --no-install-recommends "+strings.Join(imagePackages, " ")+" && apt-get clean"); err != nil {
		return fmt.Errorf("install the kernel: %w", err)
	}
	for _, f := range []struct{ glob, dst string }{
		{"boot/vmlinuz-*", "vmlinuz"},
		{"boot/initrd.img-*", "initrd.img"},
	} {
		m, _ := filepath.Glob(filepath.Join(fsDir, f.glob))
		if len(m) != 1 {
			return fmt.Errorf("want one %s in the image, found %d", f.glob, len(m))
		}
		if _, err := hostRun(ctx, "", "cp", "--", m[0], filepath.Join(dir, f.dst)); err != nil {
			return err
		}
	}
	if err := configureGuest(fsDir, r); err != nil {
		return err
	}
	if _, err := hostRun(ctx, "", "mkfs.ext4", "-q", "-F", "-L", "cohort-"+r.Name, "-d", fsDir, filepath.Join(dir, "disk.img"), imageDiskSize); err != nil {
		return fmt.Errorf("make the disk image: %w", err)
	}
	return nil
}

// agentUnitText starts the agent once the share is mounted, after giving
// eth0 the address QEMU's forwards point at (minbase has no DHCP client;
// the VM has no network beyond those forwards).
var agentUnitText = fmt.Sprintf(`[Unit]
Description=cohort vmtests agent (runs the harness's commands)
RequiresMountsFor=%[1]s
Wants=sys-subsystem-net-devices-eth0.device
After=sys-subsystem-net-devices-eth0.device

[Service]
ExecStartPre=ip link set lo up
ExecStartPre=ip link set eth0 up
ExecStartPre=ip address replace %[2]s/24 dev eth0
ExecStart=%[1]s/%[3]s -listen %[2]s:%[4]d -token-file %[1]s/%[5]s
# No OOMScoreAdjust=: the commands the agent runs would inherit it, and
# an oom_score_adj of -1000 makes a process the OOM killer cannot pick.
# The agent lives in a cgroup of its own, so a scenario's memory limits
# never make it a candidate.
Restart=on-failure

[Install]
WantedBy=multi-user.target
`, ShareDir, guestIP, agentBinary, guestAgentPort, agentTokenFile)

// configureGuest writes what the guest needs into the image's root.
func configureGuest(fsDir string, r Release) error {
	files := map[string]string{
		"etc/hostname": "cohort-vm-" + r.Name + "\n",
		"etc/fstab": "# the host share (read-only), through which files and the agent come in\n" +
			shareTag + " " + ShareDir + " 9p trans=virtio,version=9p2000.L,ro,msize=262144 0 0\n",
		"etc/systemd/system/" + agentUnit: agentUnitText,
	}
	for path, data := range files {
		if err := writeInRoot(fsDir, path, data); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Join(fsDir, strings.TrimPrefix(ShareDir, "/")), 0o755); err != nil {
		return fmt.Errorf("configure guest: %w", err)
	}
	links := map[string]string{
		"etc/systemd/system/multi-user.target.wants/" + agentUnit: "../" + agentUnit,
	}
	// Every emulated instruction counts under TCG: masked are the timers
	// that would wake up in the middle of a scenario, the login prompts and
	// logind (nobody logs in), and the first-boot updates of caches that
	// the image does not need (ldconfig, the journal catalog), which run
	// because /etc is newer than /usr. Measured: about 40 s less boot.
	for _, u := range []string{
		"apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer", "dpkg-db-backup.timer",
		"getty@.service", "serial-getty@.service", "getty.target", "systemd-logind.service", "systemd-user-sessions.service",
		"ldconfig.service", "systemd-update-done.service", "systemd-journal-catalog-update.service",
		"systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "modprobe@drm.service", "modprobe@efi_pstore.service",
	} {
		links["etc/systemd/system/"+u] = "/dev/null"
	}
	for path, target := range links {
		p := filepath.Join(fsDir, path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return fmt.Errorf("configure guest: %w", err)
		}
		_ = os.Remove(p)
		if err := os.Symlink(target, p); err != nil {
			return fmt.Errorf("configure guest: %w", err)
		}
	}
	return nil
}

func writeInRoot(fsDir, path, data string) error {
	p := filepath.Join(fsDir, path)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("write %s in the image: %w", path, err)
	}
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		return fmt.Errorf("write %s in the image: %w", path, err)
	}
	return nil
}

// nspawnOnce runs script with /bin/sh in dir as a one-shot container (no
// boot), in a cgroup subtree of its own like a booted container's.
func nspawnOnce(ctx context.Context, dir, what, script string) error {
	name := fmt.Sprintf("%s%d-%d-%s", cgroupPrefix, os.Getpid(), containerSeq.Add(1), what)
	cg, err := newCgroupSet(name)
	if err != nil {
		return err
	}
	defer func() { _ = cg.remove(context.Background()) }()
	cmd := cgroupCommand(ctx, cg, "systemd-nspawn", "--quiet", "--directory="+dir, "--register=no", "--keep-unit",
		"--pipe", "--resolv-conf=copy-host", "--setenv=DEBIAN_FRONTEND=noninteractive", "--", "/bin/sh", "-ec", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("systemd-nspawn %s: %w\n%s", what, err, tail(string(out), 40))
	}
	return nil
}
