package units

import (
	"fmt"
	"time"
)

// Service is the model of an app's <app>.service: the dispatcher, started by
// its sockets, speaking sd_notify.
type Service struct {
	Name        string // unit name, "web.service"
	Description string
	SourcePath  string   // the app file
	Sockets     []string // socket units it requires and is ordered after
	ExecStart   []string // argv of the dispatcher
	// ExecStartPre is the argv of a command run before ExecStart= with
	// full privileges (systemd's "+" prefix: as root, outside the
	// sandbox and User=); nil renders none. The generator records the
	// app's running configuration with it, which only root may write.
	ExecStartPre []string
	// ExecReload is the argv of the reload command, which must wait for
	// the reload to finish and exit non-zero when it failed; nil renders
	// no ExecReload=. It runs with full privileges ("+") like
	// ExecStartPre, so that it can record the configuration it reloaded.
	ExecReload []string
	// User and Group run the dispatcher and its workers; an empty User
	// means DynamicUser=yes.
	User, Group string
	// RuntimeDirectory is created by systemd under /run for the
	// dispatcher (notify and control sockets).
	RuntimeDirectory string
	StartTimeout     time.Duration // TimeoutStartSec=
	StopTimeout      time.Duration // TimeoutStopSec=
	Hardening        string        // "default", "strict" or "none"
	// Delegate renders Delegate=yes: the service gets a cgroup subtree
	// it may change (systemd.resource-control(5)), where its dispatcher
	// makes each worker's cgroup. The hardening's ProtectControlGroups=
	// is then "no": "yes" mounts /sys/fs/cgroup read-only, delegated
	// subtree included. The service's user owns only that subtree (systemd
	// chowns it, DynamicUser= too); the rest stays root's.
	Delegate bool
	// DelegateSubgroup is the leaf of the delegated subtree systemd
	// starts the main process in (systemd ≥ 254; "" renders none).
	DelegateSubgroup string
	// SyslogIdentifier names the dispatcher's own lines in the journal
	// (its stdout and stderr); "" renders none.
	SyslogIdentifier string
	// LogRateLimit is journald's limit of the unit's lines; nil renders
	// none (journald's default applies). An Interval of zero turns
	// journald's limit off.
	LogRateLimit *LogRateLimit
	ExtraUnit    []Option
	ExtraService []Option
}

// LogRateLimit is LogRateLimitIntervalSec= and LogRateLimitBurst=
// (systemd.exec(5)).
type LogRateLimit struct {
	Interval time.Duration
	Burst    uint32
}

// Render returns the unit file. It fails for an unknown hardening
// profile, a negative timeout, and any name or value that options.put
// refuses (see the package doc).
func (s *Service) Render() (File, error) {
	sandbox, ok := hardening(s.Hardening)
	if !ok {
		return File{}, fmt.Errorf("render %s: unknown hardening profile %q", s.Name, s.Hardening)
	}
	if s.StartTimeout < 0 || s.StopTimeout < 0 {
		return File{}, fmt.Errorf("render %s: negative timeout (start %v, stop %v)", s.Name, s.StartTimeout, s.StopTimeout)
	}
	var o options
	o.add("Unit", "Description", s.Description)
	o.add("Unit", "Documentation", "man:cohort.toml(5)")
	o.add("Unit", "SourcePath", s.SourcePath)
	for _, sock := range s.Sockets {
		o.addUnit("Unit", "Requires", sock)
		o.addUnit("Unit", "After", sock)
	}
	o.addVerbatim("Unit", s.ExtraUnit)

	o.add("Service", "Type", "notify")
	o.add("Service", "NotifyAccess", "main")
	if len(s.ExecStartPre) > 0 {
		o.addCommand("Service", "ExecStartPre", "+", s.ExecStartPre)
	}
	o.addCommand("Service", "ExecStart", "", s.ExecStart)
	if len(s.ExecReload) > 0 {
		o.addCommand("Service", "ExecReload", "+", s.ExecReload)
	}
	// mixed: SIGTERM reaches only the dispatcher, which stops its workers
	// gracefully; stragglers get SIGKILL from systemd at the end.
	o.add("Service", "KillMode", "mixed")
	o.add("Service", "Restart", "on-failure")
	o.addIf(s.StartTimeout > 0, "Service", "TimeoutStartSec", Seconds(s.StartTimeout))
	o.addIf(s.StopTimeout > 0, "Service", "TimeoutStopSec", Seconds(s.StopTimeout))
	if s.User == "" {
		o.add("Service", "DynamicUser", "yes")
	} else {
		o.add("Service", "User", s.User)
	}
	o.addIf(s.Group != "", "Service", "Group", s.Group)
	o.addIf(s.RuntimeDirectory != "", "Service", "RuntimeDirectory", s.RuntimeDirectory)
	o.addIf(s.SyslogIdentifier != "", "Service", "SyslogIdentifier", s.SyslogIdentifier)
	if l := s.LogRateLimit; l != nil {
		if l.Interval < 0 {
			return File{}, fmt.Errorf("render %s: negative LogRateLimitIntervalSec (%v)", s.Name, l.Interval)
		}
		o.add("Service", "LogRateLimitIntervalSec", Seconds(l.Interval))
		o.addIf(l.Interval > 0, "Service", "LogRateLimitBurst", fmt.Sprint(l.Burst))
	}
	if s.Delegate {
		o.add("Service", "Delegate", "yes")
		o.addIf(s.DelegateSubgroup != "", "Service", "DelegateSubgroup", s.DelegateSubgroup)
		for i, opt := range sandbox {
			if opt.Key == "ProtectControlGroups" {
				sandbox[i].Value = "no"
			}
		}
	}
	o.addVerbatim("Service", sandbox)
	o.addVerbatim("Service", s.ExtraService)
	return render(s.Name, generatedHeader(s.SourcePath), &o)
}
