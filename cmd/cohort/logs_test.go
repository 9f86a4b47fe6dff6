package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// journalEntries are entries as `journalctl -o json` writes them (one
// object per line, every value a string, binary ones as byte arrays): a
// worker line, the dispatcher's line (its stderr stream), systemd's line
// about the unit, a worker's binary line with a terminal escape and a
// newline, a line from an app not asked for, and garbage.
var journalEntries = strings.Join([]string{
	`{"__REALTIME_TIMESTAMP":"1764670000000000","PRIORITY":"6","_PID":"700","_SYSTEMD_UNIT":"web.service","SYSLOG_IDENTIFIER":"web.0/701","COHORT_APP":"web","COHORT_WORKER":"0","COHORT_PID":"701","COHORT_GENERATION":"2","MESSAGE":"listening on 3000"}`,
	`{"__REALTIME_TIMESTAMP":"1764670000000001","PRIORITY":"6","_PID":"700","_SYSTEMD_UNIT":"web.service","SYSLOG_IDENTIFIER":"cohort","MESSAGE":"reloading (control socket): generation 2"}`,
	`{"__REALTIME_TIMESTAMP":"1764670000000002","PRIORITY":"6","_PID":"1","UNIT":"web.service","_SYSTEMD_UNIT":"init.scope","MESSAGE":"Started web.service - cohort app web."}`,
	`{"__REALTIME_TIMESTAMP":"1764670000000003","PRIORITY":"3","_PID":"700","_SYSTEMD_UNIT":"web.service","COHORT_APP":"web","COHORT_WORKER":"1","COHORT_PID":"702","COHORT_GENERATION":"2","MESSAGE":[104,105,27,91,50,74,10,255,120]}`,
	`{"__REALTIME_TIMESTAMP":"1764670000000004","PRIORITY":"6","_PID":"800","_SYSTEMD_UNIT":"api.service","COHORT_APP":"api","COHORT_WORKER":"3","MESSAGE":["first","second"]}`,
	`not json`,
	`{"MESSAGE":null,"_SYSTEMD_UNIT":"web.service"}`,
}, "\n") + "\n"

// fakeJournalctl writes a journalctl that records its arguments, one a
// line, and prints journalEntries.
func fakeJournalctl(t *testing.T) (bin, argsFile string) {
	t.Helper()
	dir := t.TempDir()
	bin, argsFile = filepath.Join(dir, "journalctl"), filepath.Join(dir, "args")
	data := filepath.Join(dir, "entries")
	if err := os.WriteFile(data, []byte(journalEntries), 0o644); err != nil {
		t.Fatal(err)
	}
	script := "#!/bin/sh\nprintf '%s\\n' \"$@\" > " + argsFile + "\ncat " + data + "\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin, argsFile
}

func runLogs(t *testing.T, bin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	env := &environment{stdout: &out, stderr: &errOut, journalctl: bin, searchPath: []string{t.TempDir()}, runtimeRoot: t.TempDir()}
	code := runMain(context.Background(), env, append([]string{"logs"}, args...))
	return code, out.String(), errOut.String()
}

// TestLogsLabels: each entry gets its label (worker, dispatcher, systemd),
// a binary message is printed as its bytes, a multi-line one with its
// label on every line, garbage is reported and skipped; journalctl is
// asked for exactly the app's units, the worker, the count and the time.
func TestLogsLabels(t *testing.T) {
	bin, argsFile := fakeJournalctl(t)
	code, out, errOut := runLogs(t, bin, "web", "-n", "5", "--worker", "1", "--since", "-1h --all")
	if code != 0 {
		t.Fatalf("logs: %d %s", code, errOut)
	}
	want := "web.0 | listening on 3000\n" +
		"web.cohort | reloading (control socket): generation 2\n" +
		"web.systemd | Started web.service - cohort app web.\n" +
		"web.1 | hi\x1b[2J\n" + // not a terminal: as it is
		"web.1 | \xffx\n" +
		"api.3 | first\n" +
		"web.cohort | \n"
	if out != want {
		t.Errorf("logs printed:\n%q\nwant:\n%q", out, want)
	}
	if !strings.Contains(errOut, "malformed entry from journalctl") {
		t.Errorf("no word about the malformed entry: %q %q", errOut, out)
	}
	args, _ := os.ReadFile(argsFile)
	wantArgs := "--output=json\n--all\n--no-pager\n--lines=5\n--since=-1h --all\n--unit=web.service\n--unit=web.socket\nCOHORT_WORKER=1\n"
	if string(args) != wantArgs {
		t.Errorf("journalctl got:\n%s\nwant:\n%s", args, wantArgs)
	}

	code, _, _ = runLogs(t, bin, "-f", "-n", "all", "web")
	args, _ = os.ReadFile(argsFile)
	if code != 0 || string(args) != "--output=json\n--all\n--no-pager\n--follow\n--unit=web.service\n--unit=web.socket\n" {
		t.Errorf("-f -n all: %d, journalctl got:\n%s", code, args)
	}
	for _, bad := range [][]string{{"web", "-n", "-3"}, {"../web"}, {"a", "b"}} {
		if code, _, _ := runLogs(t, bin, bad...); code != 2 {
			t.Errorf("logs %q: exit %d, want 2", bad, code)
		}
	}
	// Without APP and without apps: nothing to read, said so.
	if code, _, errOut := runLogs(t, bin); code != 1 || !strings.Contains(errOut, "no apps") {
		t.Errorf("logs without apps: %d %s", code, errOut)
	}
}

// TestLogsJSON: --json is one object per entry with the worker's fields.
func TestLogsJSON(t *testing.T) {
	bin, _ := fakeJournalctl(t)
	code, out, errOut := runLogs(t, bin, "--json", "web")
	if code != 0 {
		t.Fatalf("logs --json: %d %s", code, errOut)
	}
	var got []logEntry
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var e logEntry
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		got = append(got, e)
	}
	if len(got) != 6 {
		t.Fatalf("%d entries:\n%s", len(got), out)
	}
	if e := got[0]; e.Source != "worker" || e.App != "web" || e.Worker == nil || *e.Worker != 0 || e.PID != 701 || e.Generation != 2 || e.Message != "listening on 3000" || e.Time.UnixMicro() != 1764670000000000 {
		t.Errorf("worker entry %+v", e)
	}
	if e := got[1]; e.Source != "cohort" || e.Worker != nil || e.PID != 700 {
		t.Errorf("dispatcher entry %+v", e)
	}
	if e := got[2]; e.Source != "systemd" || e.App != "web" {
		t.Errorf("systemd entry %+v", e)
	}
	if e := got[3]; e.Priority != 3 || e.Message != "hi\x1b[2J\n\uFFFDx" {
		t.Errorf("binary entry %+v", e)
	}
}

// TestReadEntryBound: an entry longer than maxEntry is dropped whole and
// the next one is read as it is.
func TestReadEntryBound(t *testing.T) {
	in := strings.Repeat("x", maxEntry+10) + "\n{\"MESSAGE\":\"next\"}\n"
	rd := bufio.NewReaderSize(strings.NewReader(in), 64<<10)
	line, tooLong, err := readEntry(rd)
	if !tooLong || len(line) > maxEntry || err != nil {
		t.Fatalf("long entry: %d bytes, tooLong %v, %v", len(line), tooLong, err)
	}
	line, tooLong, _ = readEntry(rd)
	if tooLong || string(line) != `{"MESSAGE":"next"}` {
		t.Errorf("next entry %q %v", line, tooLong)
	}
}

// TestLogsColor: on a terminal each worker's label has its colour, the
// dispatcher's is bold, and a worker's terminal escapes are made visible.
func TestLogsColor(t *testing.T) {
	p := &logPrinter{units: map[string]string{"web.service": "web"}, color: true}
	var out bytes.Buffer
	for _, l := range strings.Split(strings.TrimSpace(journalEntries), "\n")[:4] {
		if err := p.print(&out, []byte(l)); err != nil {
			t.Fatal(err)
		}
	}
	want := "\x1b[36mweb.0\x1b[0m | listening on 3000\n" +
		"\x1b[1mweb.cohort\x1b[0m | reloading (control socket): generation 2\n" +
		"\x1b[1mweb.systemd\x1b[0m | Started web.service - cohort app web.\n" +
		"\x1b[33mweb.1\x1b[0m | hi\\x1b[2J\n" +
		"\x1b[33mweb.1\x1b[0m | \uFFFDx\n"
	if out.String() != want {
		t.Errorf("coloured:\n%q\nwant:\n%q", out.String(), want)
	}
}
