package units

import (
	"strings"
	"testing"
	"time"
)

func TestQuoteCommand(t *testing.T) {
	tests := []struct {
		argv []string
		want string
	}{
		{[]string{"/usr/bin/cohort", "dispatch", "/etc/cohort/web.toml"}, "/usr/bin/cohort dispatch /etc/cohort/web.toml"},
		{[]string{"/bin/app", "two words"}, `/bin/app "two words"`},
		{[]string{"/bin/app", "100%"}, "/bin/app 100%%"},
		{[]string{"/bin/app", "$HOME"}, "/bin/app $$HOME"},
		{[]string{"/bin/app", `say "hi"\n`}, `/bin/app "say \"hi\"\\n"`},
		{[]string{"/bin/app", ""}, `/bin/app ""`},
		{[]string{"/bin/app", "a;b"}, `/bin/app "a;b"`},
	}
	for _, tt := range tests {
		if got := QuoteCommand(tt.argv); got != tt.want {
			t.Errorf("QuoteCommand(%q) = %s, want %s", tt.argv, got, tt.want)
		}
	}
}

func TestSeconds(t *testing.T) {
	for d, want := range map[time.Duration]string{
		45 * time.Second: "45s", 1500 * time.Millisecond: "1500ms", time.Minute: "60s", 0: "0s",
	} {
		if got := Seconds(d); got != want {
			t.Errorf("Seconds(%v) = %s, want %s", d, got, want)
		}
	}
}

func TestServiceRender(t *testing.T) {
	base := Service{Name: "web.service", Description: "d", SourcePath: "/etc/cohort/web.toml",
		Sockets: []string{"web.socket"}, ExecStart: []string{"/usr/bin/cohort", "dispatch", "/etc/cohort/web.toml"}}
	tests := []struct {
		name       string
		edit       func(*Service)
		has, lacks []string
	}{
		{"dynamic user and default hardening", func(s *Service) { s.Hardening = "default" },
			[]string{"DynamicUser=yes\n", "Type=notify\n", "NotifyAccess=main\n", "KillMode=mixed\n", "ProtectSystem=strict\n"},
			[]string{"\nUser=", "MemoryDenyWriteExecute"}},
		{"named user, strict", func(s *Service) { s.Hardening = "strict"; s.User = "web"; s.Group = "www" },
			[]string{"User=web\n", "Group=www\n", "MemoryDenyWriteExecute=yes\n"}, []string{"DynamicUser"}},
		{"no hardening", func(s *Service) { s.Hardening = "none" },
			[]string{"ExecStart=/usr/bin/cohort dispatch /etc/cohort/web.toml\n"}, []string{"ProtectSystem", "NoNewPrivileges"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := base
			tt.edit(&s)
			f, err := s.Render()
			if err != nil {
				t.Fatal(err)
			}
			for _, want := range tt.has {
				if !strings.Contains(string(f.Content), want) {
					t.Errorf("lacks %q:\n%s", want, f.Content)
				}
			}
			for _, bad := range tt.lacks {
				if strings.Contains(string(f.Content), bad) {
					t.Errorf("has %q:\n%s", bad, f.Content)
				}
			}
		})
	}
	s := base
	s.Hardening = "paranoid"
	if _, err := s.Render(); err == nil {
		t.Error("unknown hardening profile rendered")
	}
}

func TestSocketRenderEscapesSpecifiers(t *testing.T) {
	f, err := (&Socket{Name: "a.socket", ListenStream: "/run/100%.sock", FileDescriptorName: "x", Service: "a.service", SocketMode: 0o600}).Render()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ListenStream=/run/100%%.sock\n", "SocketMode=0600\n", "FileDescriptorName=x\n"} {
		if !strings.Contains(string(f.Content), want) {
			t.Errorf("lacks %q:\n%s", want, f.Content)
		}
	}
}

// TestServiceLogRateLimit: journald's limit and the dispatcher's
// identifier are rendered when set; an interval of 0 turns journald's
// limit off and needs no burst.
func TestServiceLogRateLimit(t *testing.T) {
	base := Service{Name: "web.service", Description: "d", SourcePath: "/etc/cohort/web.toml", ExecStart: []string{"/usr/bin/cohort"}, Hardening: "none"}
	for _, tt := range []struct {
		limit *LogRateLimit
		ident string
		want  []string
		not   []string
	}{
		{nil, "", nil, []string{"LogRateLimit", "SyslogIdentifier"}},
		{&LogRateLimit{Interval: 30 * time.Second, Burst: 61300}, "web", []string{"\nLogRateLimitIntervalSec=30s\n", "\nLogRateLimitBurst=61300\n", "\nSyslogIdentifier=web\n"}, nil},
		{&LogRateLimit{}, "100%", []string{"\nLogRateLimitIntervalSec=0s\n", "\nSyslogIdentifier=100%%\n"}, []string{"LogRateLimitBurst"}},
	} {
		s := base
		s.LogRateLimit, s.SyslogIdentifier = tt.limit, tt.ident
		f, err := s.Render()
		if err != nil {
			t.Fatalf("%+v: %v", tt.limit, err)
		}
		for _, w := range tt.want {
			if !strings.Contains(string(f.Content), w) {
				t.Errorf("%+v: no %q in\n%s", tt.limit, w, f.Content)
			}
		}
		for _, n := range tt.not {
			if strings.Contains(string(f.Content), n) {
				t.Errorf("%+v: %q in\n%s", tt.limit, n, f.Content)
			}
		}
	}
	s := base
	s.LogRateLimit = &LogRateLimit{Interval: -time.Second}
	if _, err := s.Render(); err == nil {
		t.Errorf("a negative interval rendered")
	}
}
