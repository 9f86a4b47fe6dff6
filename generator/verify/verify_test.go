package verify

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/internal/testtool"
	"github.com/cohort-dev/cohort/units"
)

const unitFile = "# header\n\n[Unit]\nDescription=x\n\n[Service]\nExecStart=/bin/sh\nMemoryMx=1G\n"

// TestParse reads both wordings of the unknown-key warning (systemd 252's
// and the later one) and maps a line back to its section and key.
func TestParse(t *testing.T) {
	out := "/tmp/v/web.service:8: Unknown key 'MemoryMx' in section [Service], ignoring.\n" +
		"/tmp/v/web.service:8: Unknown key name 'MemoryMx' in section 'Service', ignoring.\n" +
		"/tmp/v/web.service:7: Failed to parse something, ignoring: x\n" +
		"/tmp/v/web.service: Command /x is not executable: No such file or directory\n" +
		"/other/file.service:3: not ours\n" +
		"something else\n"
	got := Parse([]byte(out), func(p string) ([]byte, string, bool) {
		return []byte(unitFile), "web.service", p == "/tmp/v/web.service"
	})
	want := []Complaint{
		{Unit: "web.service", Line: 8, Section: "Service", Key: "MemoryMx", Msg: "Unknown key 'MemoryMx' in section [Service], ignoring.", Unknown: true},
		{Unit: "web.service", Line: 8, Section: "Service", Key: "MemoryMx", Msg: "Unknown key name 'MemoryMx' in section 'Service', ignoring.", Unknown: true},
		{Unit: "web.service", Line: 7, Section: "Service", Key: "ExecStart", Msg: "Failed to parse something, ignoring: x"},
		{Unit: "web.service", Msg: "Command /x is not executable: No such file or directory"},
		{Msg: "/other/file.service:3: not ours"},
		{Msg: "something else"},
	}
	if !slices.Equal(got, want) {
		t.Errorf("got  %+v\nwant %+v", got, want)
	}
}

func TestParseDirectives(t *testing.T) {
	got := ParseDirectives([]byte("[Unit]\nDescription=STRING\nAfter=UNIT [...]\n[Service]\nMemoryMax=LIMIT\n[Socket]\nMemoryMax=LIMIT\nMemoryMax=LIMIT\n"))
	if !slices.Equal(got["Unit"], []string{"Description", "After"}) || !slices.Equal(got["Service"], []string{"MemoryMax"}) || !slices.Equal(got["Socket"], []string{"MemoryMax"}) {
		t.Errorf("got %v", got)
	}
}

// TestUnitsRealAnalyzer runs the real systemd-analyze verify and the real
// systemd --dump-configuration-items of this host.
func TestUnitsRealAnalyzer(t *testing.T) {
	testtool.Need(t, "systemd-analyze")
	cs, err := Units(context.Background(), []units.File{{Name: "web.service", Content: []byte(unitFile)}})
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 1 || !cs[0].Unknown || cs[0].Key != "MemoryMx" || cs[0].Section != "Service" || cs[0].Line != 8 {
		t.Errorf("complaints %+v", cs)
	}
	known := Directives(context.Background())
	if !slices.Contains(known["Service"], "MemoryMax") || !slices.Contains(known["Socket"], "Backlog") || !slices.Contains(known["Unit"], "After") {
		t.Errorf("directives: %d sections, Service has %d", len(known), len(known["Service"]))
	}
}

// FuzzParse: the output readers never panic, and a complaint's line is
// either 0 or one verify printed.
func FuzzParse(f *testing.F) {
	f.Add([]byte("/tmp/v/web.service:8: Unknown key 'MemoryMx' in section [Service], ignoring.\n"), []byte(unitFile))
	f.Add([]byte("/tmp/v/web.service:99999: Unknown key name '' in section '', ignoring.\n/tmp/v/web.service: x\n"), []byte("[Unit]\n=\n"))
	f.Fuzz(func(t *testing.T, out, content []byte) {
		for _, c := range Parse(out, func(p string) ([]byte, string, bool) { return content, "web.service", strings.HasPrefix(p, "/tmp/v/") }) {
			if c.Line < 0 || c.Line > 999999999 {
				t.Fatalf("line %d", c.Line)
			}
		}
		ParseDirectives(out)
	})
}
