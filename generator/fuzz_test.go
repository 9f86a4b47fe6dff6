package generator

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/units"
	"github.com/coreos/go-systemd/v22/unit"
)

// FuzzRender parses arbitrary app files, read from arbitrary directories,
// and renders the units of each that validates. A real unit parser (go-
// systemd's unit.Deserialize) reads every unit back, and the directive set
// must be exactly the one the app asked for: no section or key that the
// model did not put there (what an injected "\nExecStartPre=…" would add),
// and every value cohort derives from the file (addresses, names, paths,
// the command line, pass-through directives) reads back as itself. An app
// that validates must render: the config and units/ refuse the same
// values. The committed corpus is in testdata/fuzz/FuzzRender;
// TestVerifyFuzzCorpus also runs systemd-analyze verify on its renderings.
func FuzzRender(f *testing.F) {
	for _, s := range renderSeeds {
		f.Add(s.dir, []byte(s.src))
	}
	f.Fuzz(func(t *testing.T, dir string, data []byte) {
		app, us := renderFuzzed(t, dir, data)
		if app != nil {
			checkRoundTrip(t, app, us)
		}
	})
}

// renderSeeds are FuzzRender's built-in seeds: the injections of issue 14
// (each must be refused) and good apps whose values need escaping.
var renderSeeds = []struct{ dir, src string }{
	{"/etc/cohort", "command = [\"/bin/app\"]\n[[listen]]\nname = \"http\"\naddress = \"/run/a.sock\\nExecStartPre=/usr/bin/touch /run/pwned\"\n"},
	{"/etc/cohort", "command = [\"/bin/app\"]\n[service]\nEnvironment = \"A=1\\u0000User=root\"\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"},
	{"/etc/cohort", "command = [\"/bin/app\"]\n[[listen]]\nname = \"http\"\naddress = \"[fe80::1%eth0\\nExecStartPre=/bin/x]:80\"\n"},
	{"/etc/cohort", "command = [\"/bin/app\"]\n[[listen]]\nname = \"http\"\naddress = \"@abs\\rUser=root\"\n"},
	{"/tmp/d\nExecStartPre=/usr/bin/touch /run/pwned", "command = [\"/bin/app\"]\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"},
	{"/etc/cohort", "command = [\"/bin/app\"]\n[unit]\nDescription = 'x\\'\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"},
	{"/srv/100% \"quoted\" $HOME\\dir;x", "command = [\"/bin/app\"]\nuser = \"web\"\ngroup = \"www\"\n[unit]\nDescription = \"web %n\"\n[service]\nEnvironment = [\"A=1\", \"B=%%\"]\nLimitNOFILE = 65536\n[[listen]]\nname = \"sock\"\naddress = \"/run/web/100%.sock\"\nsocket_user = \"web\"\nsocket_mode = \"0660\"\n[[listen]]\nname = \"v6\"\naddress = \"[::1]:8080\"\n[[listen]]\nname = \"abs\"\naddress = \"@web%i\"\n"},
	{"/etc/cohort", "command = [\"/bin/app\"]\nmode = \"reuseport\"\nworkers = 3\n[socket]\nFreeBind = true\n[[listen]]\nname = \"http\"\naddress = \":8080\"\nnodelay = true\nkeepalive = true\nbacklog = 128\n"},
	{"/etc/cohort", "command = [\"/bin/app\"]\nstop_timeout = \"9223372036s\"\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"},
}

// renderFuzzed parses data as the app file fuzz.toml in dir and renders
// it; it returns nil when the file does not validate.
func renderFuzzed(t testing.TB, dir string, data []byte) (*appfile.App, *Units) {
	t.Helper()
	if !strings.HasPrefix(dir, "/") {
		dir = "/" + dir
	}
	app, err := appfile.Parse(strings.TrimSuffix(dir, "/")+"/fuzz.toml", data)
	if err != nil {
		return nil, nil
	}
	// Thousands of reuseport sockets say nothing new and slow the fuzzer.
	if app.Mode == appfile.ModeReusePort && (app.Workers.Auto || app.Workers.N > 4) {
		app.Workers = appfile.Workers{N: 3}
	}
	us, err := Render(app, Options{CPUs: 2})
	if err != nil {
		t.Fatalf("a valid app does not render: %v", err)
	}
	return app, us
}

// directive is one Key=Value as read back, in its section.
type directive struct{ section, key, value string }

// checkRoundTrip reads every unit of us back and compares it with what
// app asked for.
func checkRoundTrip(t *testing.T, app *appfile.App, us *Units) {
	t.Helper()
	sockets, err := Sockets(app, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(us.Files) != len(sockets)+1 {
		t.Fatalf("%d unit files for %d sockets", len(us.Files), len(sockets))
	}
	names := make([]string, len(sockets))
	for i, s := range sockets {
		names[i] = s.Unit
	}
	for i, s := range sockets {
		got := readBack(t, us.Files[i])
		l := s.Listener
		ref := &units.Socket{Name: "ref.socket", Service: "ref.service", ListenStream: "x", FileDescriptorName: "x",
			Backlog: l.Backlog, ReusePort: l.ReusePort || app.Mode == appfile.ModeReusePort, NoDelay: l.NoDelay, KeepAlive: l.KeepAlive,
			SocketUser: l.SocketUser, SocketGroup: l.SocketGroup, SocketMode: l.SocketMode}
		if i == 0 {
			ref.Wants = names[1:]
			ref.ExecStartPre, ref.ExecStopPost = []string{"/x"}, []string{"/x"}
		} else {
			ref.PartOf = names[0]
		}
		want := expectKeys(t, ref.Render, app.Unit, app.Socket, "Socket")
		checkKeys(t, us.Files[i].Name, got, want)
		desc := fmt.Sprintf("cohort app %s: listener %s on %s", app.Name, l.Name, l.Address)
		if s.Slot >= 0 {
			desc += fmt.Sprintf(" for worker %d", s.Slot)
		}
		checkValues(t, us.Files[i].Name, got, map[string]string{
			"Unit/Description": desc, "Unit/SourcePath": app.Path,
			"Socket/ListenStream": listenStream(l), "Socket/FileDescriptorName": s.FDName, "Socket/Service": app.Name + ".service",
			"Socket/SocketUser": l.SocketUser, "Socket/SocketGroup": l.SocketGroup,
		})
		checkPassThrough(t, us.Files[i].Name, got, "Unit", app.Unit)
		checkPassThrough(t, us.Files[i].Name, got, "Socket", app.Socket)
	}

	svc := us.Files[len(sockets)]
	got := readBack(t, svc)
	ref := &units.Service{Name: "ref.service", ExecStartPre: []string{"/x"}, ExecStart: []string{"/x"}, ExecReload: []string{"/x"}, Sockets: names,
		User: app.User, Group: app.Group, RuntimeDirectory: "x", StartTimeout: 1, StopTimeout: 1, Hardening: app.Hardening, Delegate: true,
		SyslogIdentifier: "x", LogRateLimit: JournalRateLimit(app.LogRateLimit, 1)}
	want := expectKeys(t, ref.Render, app.Unit, app.Service, "Service")
	checkKeys(t, svc.Name, got, want)
	checkValues(t, svc.Name, got, map[string]string{
		"Unit/SourcePath": app.Path, "Service/User": app.User, "Service/Group": app.Group,
		"Service/RuntimeDirectory": "cohort/" + app.Name, "Service/SyslogIdentifier": app.Name,
	})
	// ExecStartPre= and ExecReload= run as root ("+"): they record the
	// running configuration, which workers must not be able to write.
	for key, want := range map[string]struct {
		prefix string
		argv   []string
	}{
		"ExecStartPre": {"+", []string{DefaultCohortPath, "dispatch-prepare", app.Path}},
		"ExecStart":    {"", []string{DefaultCohortPath, "dispatch", app.Path}},
		"ExecReload":   {"+", []string{DefaultCohortPath, "dispatch-reload", app.Path}},
	} {
		line := ""
		for _, d := range got {
			if d.section == "Service" && d.key == key {
				line = d.value
			}
		}
		argv := want.argv
		rest, ok := strings.CutPrefix(line, want.prefix)
		if words, err := splitCommand(rest); !ok || err != nil || !slices.Equal(words, argv) {
			t.Errorf("%s: %s=%s reads back as %q (%v), want %q", svc.Name, key, line, words, err, argv)
		}
	}
	checkPassThrough(t, svc.Name, got, "Unit", app.Unit)
	checkPassThrough(t, svc.Name, got, "Service", app.Service)
}

// readBack parses a rendered unit with go-systemd. Its header must be
// comments only: a line in it that is not would be a directive.
func readBack(t *testing.T, f units.File) []directive {
	t.Helper()
	head, body, ok := bytes.Cut(f.Content, []byte("\n\n"))
	if !ok {
		t.Fatalf("%s: no blank line after the header:\n%s", f.Name, f.Content)
	}
	for _, line := range bytes.Split(head, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte("# ")) {
			t.Fatalf("%s: header line %q is not a comment", f.Name, line)
		}
	}
	opts, err := unit.DeserializeOptions(bytes.NewReader(body))
	if err != nil {
		if strings.Contains(err.Error(), "line too long") {
			t.Skipf("%s: go-systemd's line limit: %v", f.Name, err)
		}
		t.Fatalf("%s does not parse: %v\n%s", f.Name, err, f.Content)
	}
	out := make([]directive, len(opts))
	for i, o := range opts {
		out[i] = directive{o.Section, o.Name, o.Value}
	}
	return out
}

// expectKeys renders ref (the same unit with harmless values and no
// pass-through) and returns its section/key list plus the pass-through
// keys: what the real unit must hold, in some order.
func expectKeys(t *testing.T, render func() (units.File, error), unitExtra, extra []appfile.Directive, section string) []string {
	t.Helper()
	f, err := render()
	if err != nil {
		t.Fatalf("reference unit: %v", err)
	}
	opts, err := unit.DeserializeOptions(bytes.NewReader(f.Content))
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, o := range opts {
		keys = append(keys, o.Section+"/"+o.Name)
	}
	for _, d := range unitExtra {
		keys = append(keys, "Unit/"+d.Key)
	}
	for _, d := range extra {
		keys = append(keys, section+"/"+d.Key)
	}
	slices.Sort(keys)
	return keys
}

func checkKeys(t *testing.T, name string, got []directive, want []string) {
	t.Helper()
	keys := make([]string, len(got))
	for i, d := range got {
		keys[i] = d.section + "/" + d.key
	}
	slices.Sort(keys)
	if !slices.Equal(keys, want) {
		t.Errorf("%s holds the directives\n%q\nwant\n%q", name, keys, want)
	}
}

// checkValues compares the first value of each section/key with want,
// after systemd's specifier unescaping ("%%" is "%"); an empty want means
// the key must be absent.
func checkValues(t *testing.T, name string, got []directive, want map[string]string) {
	t.Helper()
	for sk, w := range want {
		section, key, _ := strings.Cut(sk, "/")
		v, found := "", false
		for _, d := range got {
			if d.section == section && d.key == key {
				v, found = d.value, true
				break
			}
		}
		if w == "" && !found {
			continue
		}
		if u, err := unescapeSpecifiers(v); err != nil || u != w {
			t.Errorf("%s: %s reads back as %q (%q, %v), want %q", name, sk, v, u, err, w)
		}
	}
}

// checkPassThrough: the pass-through directives read back verbatim, in
// order.
func checkPassThrough(t *testing.T, name string, got []directive, section string, want []appfile.Directive) {
	t.Helper()
	keys := map[string]bool{}
	for _, d := range want {
		keys[d.Key] = true
	}
	var have []appfile.Directive
	for _, d := range got {
		if d.section == section && keys[d.key] {
			have = append(have, appfile.Directive{Key: d.key, Value: d.value})
		}
	}
	// cohort may write a key that is also passed through (After=, in the
	// service): compare the tail, where pass-through directives go.
	if len(have) < len(want) || !slices.Equal(have[len(have)-len(want):], want) {
		t.Errorf("%s: [%s] pass-through reads back as %q, want %q", name, section, have, want)
	}
}

// unescapeSpecifiers undoes "%%"; any other '%' would be a specifier
// systemd expands, which cohort must never write.
func unescapeSpecifiers(s string) (string, error) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b.WriteByte(s[i])
			continue
		}
		if i+1 >= len(s) || s[i+1] != '%' {
			return "", fmt.Errorf("unescaped specifier at byte %d", i)
		}
		b.WriteByte('%')
		i++
	}
	return b.String(), nil
}

// splitCommand reads a command line the way systemd.service(5) describes
// it for the words QuoteCommand writes: words split at spaces, double
// quotes with \\ and \" inside, then "%%" is '%' and "$$" is '$'. Anything
// else that systemd would interpret (an unescaped specifier or variable,
// an unquoted backslash or semicolon) is an error.
func splitCommand(s string) ([]string, error) {
	var words []string
	for s != "" {
		s = strings.TrimLeft(s, " ")
		if s == "" {
			break
		}
		var w strings.Builder
		if s[0] == '"' {
			i := 1
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' {
					i++
					if i >= len(s) || (s[i] != '\\' && s[i] != '"') {
						return nil, fmt.Errorf("escape in %q", s)
					}
				}
				w.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, fmt.Errorf("unterminated quote in %q", s)
			}
			s = s[i+1:]
			if s != "" && s[0] != ' ' {
				return nil, fmt.Errorf("text after a quote in %q", s)
			}
		} else {
			end := strings.IndexByte(s, ' ')
			if end < 0 {
				end = len(s)
			}
			if strings.ContainsAny(s[:end], "\\;\"'") {
				return nil, fmt.Errorf("unquoted special character in %q", s[:end])
			}
			w.WriteString(s[:end])
			s = s[end:]
		}
		word, err := unescapeSpecifiers(w.String())
		if err != nil {
			return nil, err
		}
		var out strings.Builder
		for i := 0; i < len(word); i++ {
			if word[i] == '$' {
				if i+1 >= len(word) || word[i+1] != '$' {
					return nil, fmt.Errorf("unescaped variable in %q", word)
				}
				i++
			}
			out.WriteByte(word[i])
		}
		words = append(words, out.String())
	}
	return words, nil
}

// TestRenderSeeds runs FuzzRender's checks on its seeds and says which of
// them must be refused, so the injection strings of issue 14 stay
// refused.
func TestRenderSeeds(t *testing.T) {
	refused := 0
	for _, s := range renderSeeds {
		if app, us := renderFuzzed(t, s.dir, []byte(s.src)); app != nil {
			checkRoundTrip(t, app, us)
		} else {
			refused++
		}
	}
	if refused != 7 {
		t.Errorf("%d seeds refused, want the 7 hostile ones", refused)
	}
}

// TestVerifyFuzzCorpus runs systemd-analyze verify on the units of every
// app in FuzzRender's committed corpus (and its built-in seeds) that
// validates, with verifyUnits, the check the golden files get.
func TestVerifyFuzzCorpus(t *testing.T) {
	type input struct{ dir, src string }
	inputs := []input{}
	for _, s := range renderSeeds {
		inputs = append(inputs, input{s.dir, s.src})
	}
	files, _ := filepath.Glob("testdata/fuzz/FuzzRender/*")
	if len(files) == 0 {
		t.Fatal("no committed FuzzRender corpus")
	}
	for _, f := range files {
		args, err := readCorpusFile(f)
		if err != nil || len(args) != 2 {
			t.Fatalf("%s: %v", f, err)
		}
		inputs = append(inputs, input{args[0], args[1]})
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	rendered := 0
	for i, in := range inputs {
		dir := in.dir
		if !strings.HasPrefix(dir, "/") {
			dir = "/" + dir
		}
		app, err := appfile.Parse(strings.TrimSuffix(dir, "/")+"/fuzz.toml", []byte(in.src))
		if err != nil {
			continue
		}
		us, err := Render(app, Options{CPUs: 2, CohortPath: self})
		if err != nil {
			t.Errorf("input %d: %v", i, err)
			continue
		}
		rendered++
		verifyUnits(t, fmt.Sprintf("input %d (%q)", i, app.Path), us.Files)
	}
	if rendered == 0 {
		t.Error("no input rendered")
	}
}

// readCorpusFile reads a "go test fuzz v1" file's arguments, each a Go
// string or []byte literal.
func readCorpusFile(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(lines) == 0 || lines[0] != "go test fuzz v1" {
		return nil, fmt.Errorf("not a fuzz corpus file")
	}
	var out []string
	for _, l := range lines[1:] {
		lit, ok := strings.CutPrefix(l, "string(")
		if !ok {
			lit, ok = strings.CutPrefix(l, "[]byte(")
		}
		if !ok || !strings.HasSuffix(lit, ")") {
			return nil, fmt.Errorf("line %q", l)
		}
		s, err := strconv.Unquote(strings.TrimSuffix(lit, ")"))
		if err != nil {
			return nil, fmt.Errorf("line %q: %w", l, err)
		}
		out = append(out, s)
	}
	return out, nil
}

// verifyUnits writes files into a temporary directory and runs
// `systemd-analyze verify --man=no` on them; any output is a failure
// (verify only warns about unknown keys and bad values).
func verifyUnits(t *testing.T, what string, files []units.File) {
	t.Helper()
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze not found: install the systemd package (apt-get install systemd); .ci/run does")
	}
	tmp := t.TempDir()
	var args []string
	for _, f := range files {
		dst := filepath.Join(tmp, f.Name)
		if err := os.WriteFile(dst, f.Content, 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, dst)
	}
	slices.Sort(args)
	out, err := exec.Command(analyze, append([]string{"verify", "--man=no"}, args...)...).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify %s: %v\n%s", what, err, out)
	}
}
