package packaging

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// bashCompletion is Debian's bash-completion, which the completion's
// _init_completion and _filedir come from.
const bashCompletion = "/usr/share/bash-completion/bash_completion"

// complete runs real bash with bash-completion and cohort's completion
// loaded, completes the command line words (the last one is the word
// being completed) and returns what the completion offers.
func complete(t *testing.T, script string, words ...string) []string {
	t.Helper()
	quoted := make([]string, len(words))
	for i, w := range words {
		quoted[i] = "'" + strings.ReplaceAll(w, "'", `'\''`) + "'"
	}
	prog := `. ` + bashCompletion + `
. "$1"
COMP_WORDS=(` + strings.Join(quoted, " ") + `)
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE="${COMP_WORDS[*]}"
COMP_POINT=${#COMP_LINE}
COMPREPLY=()
_cohort cohort "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
`
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "--norc", "--noprofile", "-c", prog, "bash", script)
	cmd.Dir = t.TempDir() // _filedir lists files: none here
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || stderr.Len() > 0 {
		t.Fatalf("completing %q: %v\n%s", words, err, stderr.String())
	}
	return strings.Fields(string(out))
}

// TestCompletionWordsAreAccepted: every subcommand and every option the
// bash completion offers is one the built cohort accepts: `cohort CMD
// --help` and `cohort CMD OPTION [VALUE] --help` exit 0 without "flag
// provided but not defined" (the completion offered --no-pager, which
// cohort rejects, and lacked scale and --socket), and every option a
// command's help lists is offered. The values it offers for
// an option are ones that option's help names.
func TestCompletionWordsAreAccepted(t *testing.T) {
	_, bashErr := exec.LookPath("bash")
	_, bcErr := os.Stat(bashCompletion)
	needOrFail(t, "bash and bash-completion are needed", bashErr == nil && bcErr == nil)
	root := repoRoot(t)
	script := filepath.Join(root, "packaging", "bash-completion", "cohort")
	bin := filepath.Join(t.TempDir(), "cohort")
	run(t, root, "go", "build", "-o", bin, "./cmd/cohort")

	// cohort runs the binary and returns its exit status and output.
	cohort := func(args ...string) (int, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, args...)
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode(), string(out)
		} else if err != nil {
			t.Fatalf("cohort %q: %v", args, err)
		}
		return 0, string(out)
	}
	accepted := func(what string, args ...string) {
		t.Helper()
		code, out := cohort(args...)
		if code != 0 || strings.Contains(out, "not defined") || strings.Contains(out, "unknown flag") || strings.Contains(out, "unknown command") {
			t.Errorf("%s: cohort %s exits %d:\n%s", what, strings.Join(args, " "), code, out)
		}
	}

	for _, opt := range complete(t, script, "cohort", "-") {
		accepted("top-level option "+opt, opt)
	}
	commands := complete(t, script, "cohort", "")
	for _, want := range []string{"run", "check", "generate", "status", "scale", "reload", "list", "version", "help"} {
		if !slices.Contains(commands, want) {
			t.Errorf("the completion does not offer the command %q (offers %q)", want, commands)
		}
	}
	// A flag's line in `cohort CMD --help`: "  -name" for a boolean, "  -name TYPE" for one with a value.
	flagLine := regexp.MustCompile(`(?m)^  -([a-z-]+)(?: (\S+))?$`)
	tested := 0
	for _, cmd := range commands {
		accepted("command "+cmd, cmd, "--help")
		_, help := cohort(cmd, "--help")
		values := map[string]string{} // flag → its value type, "" for a boolean
		for _, m := range flagLine.FindAllStringSubmatch(help, -1) {
			// One-letter flags are offered as -f, as journalctl's are.
			if len(m[1]) == 1 {
				values["-"+m[1]] = m[2]
			} else {
				values["--"+m[1]] = m[2]
			}
		}
		offered := complete(t, script, "cohort", cmd, "-")
		for flag := range values {
			if !slices.Contains(offered, flag) {
				t.Errorf("cohort %s has %s, which the completion does not offer (offers %q)", cmd, flag, offered)
			}
		}
		tested += len(offered)
		for _, opt := range offered {
			args := []string{cmd, opt}
			if typ, ok := values[opt]; ok && typ != "" {
				v := "1"
				if typ == "duration" {
					v = "1s"
				}
				args = append(args, v)
				// The values offered for the option are named in its help.
				usage := help[strings.Index(help, "  -"+strings.TrimLeft(opt, "-")+" "):]
				if i := strings.Index(usage[3:], "\n  -"); i >= 0 {
					usage = usage[:i+3]
				}
				for _, val := range complete(t, script, "cohort", cmd, opt, "") {
					if !strings.Contains(usage, val) {
						t.Errorf("cohort %s %s: the completion offers %q, which its help does not name:\n%s", cmd, opt, val, usage)
					}
				}
			}
			accepted("cohort "+cmd+" option "+opt, append(args, "--help")...)
		}
	}
	t.Logf("%d commands, %d options run through the binary", len(commands), tested)
}
