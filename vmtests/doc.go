// Package vmtests runs cohort end to end under a real systemd: each test
// group boots a Debian root as PID 1 of its own container with
// systemd-nspawn, installs cohort into it the way a user would, and asserts
// what systemd itself reports (systemctl, journalctl, systemd-analyze).
//
// The tests skip unless COHORT_VMTEST=1 (`make vmtest` sets it), so
// `go test ./...` stays fast. With it set they need root; the harness
// installs its host tools (systemd-container, debootstrap) when they are
// missing and builds one cached root per Debian release under
// .cache/vmtests/ the first time.
//
// A scenario looks like this:
//
//	func TestSomething(t *testing.T) {
//		vmtests.Require(t)
//		for _, r := range vmtests.SelectedReleases() {
//			t.Run(r.Name, func(t *testing.T) {
//				t.Parallel()
//				c := vmtests.Boot(t, r)        // powered off by t.Cleanup
//				vmtests.InstallCohort(t, c)
//				c.Watch(t, "web.socket", "web.service")
//				c.WriteFile(t, "/etc/cohort/web.toml", toml, 0o644)
//				c.Run(t, "systemctl", "daemon-reload")
//			})
//		}
//	}
//
// Every container lives in a cgroup subtree of its own (see cgroup.go), so
// that powering it off also ends every process the test started in it, and
// a test process that crashed leaves nothing that the next run does not
// sweep away. Scenarios that need a kernel with cgroup2 controllers
// (limits, OOM kills, delegation; this development host is hybrid) run in
// QEMU guests instead: BootVM returns a *Container with the same methods,
// whose commands go to a guest agent (internal/vmagent); TestQEMU runs
// them. README.md describes the cache, the timings, the cgroup handling
// and the QEMU backend.
package vmtests
