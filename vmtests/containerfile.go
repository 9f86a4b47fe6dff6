package vmtests

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
)

// Instruction is one instruction of a Containerfile (the Dockerfile
// syntax podman and docker read): its keyword in capitals, its arguments
// as written (continuation lines joined) and the line it starts on.
type Instruction struct {
	Keyword string
	Args    string
	Line    int
}

// ParseContainerfile reads the instructions of the Containerfile at path:
// comment lines (# first) and blank lines are skipped, also inside a
// continuation, and a line that ends in a backslash goes on on the next
// one, as Docker's parser does. Parser directives (# syntax=…) and
// heredocs are not supported; they are rejected rather than misread.
func ParseContainerfile(path string) ([]Instruction, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read Containerfile: %w", err)
	}
	var out []Instruction
	var cur *Instruction
	for i, line := range strings.Split(string(b), "\n") {
		n := i + 1
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			if strings.HasPrefix(strings.ReplaceAll(trimmed, " ", ""), "#syntax=") || strings.HasPrefix(strings.ReplaceAll(trimmed, " ", ""), "#escape=") {
				return nil, fmt.Errorf("%s:%d: parser directives are not supported", path, n)
			}
			continue
		}
		body, more := strings.CutSuffix(trimmed, "\\")
		if cur == nil {
			kw, args, _ := strings.Cut(body, " ")
			cur = &Instruction{Keyword: strings.ToUpper(kw), Args: strings.TrimSpace(args), Line: n}
		} else {
			cur.Args = strings.TrimSpace(cur.Args + " " + strings.TrimSpace(body))
		}
		if strings.Contains(cur.Args, "<<") {
			return nil, fmt.Errorf("%s:%d: heredocs are not supported", path, cur.Line)
		}
		if !more {
			out = append(out, *cur)
			cur = nil
		}
	}
	if cur != nil {
		return nil, fmt.Errorf("%s:%d: %s continues past the end of the file", path, cur.Line, cur.Keyword)
	}
	return out, nil
}

// ExecForm decodes the JSON array form of ENTRYPOINT and CMD
// (["cohort", "run"]); the shell form is refused: an ENTRYPOINT in
// shell form runs /bin/sh as PID 1, not the program.
func (in Instruction) ExecForm() ([]string, error) {
	var argv []string
	if !strings.HasPrefix(in.Args, "[") || json.Unmarshal([]byte(in.Args), &argv) != nil || len(argv) == 0 {
		return nil, fmt.Errorf("line %d: %s %s: want the exec form, a JSON array of strings", in.Line, in.Keyword, in.Args)
	}
	return argv, nil
}

var varRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)`)

// expand replaces ${NAME} and $NAME in s by vars, as Docker does in COPY,
// ENV, USER and the like; a name vars lacks is an error (Docker would make
// it "", which hides a missing --build-arg).
func expand(s string, vars map[string]string) (string, error) {
	var missing []string
	out := varRef.ReplaceAllStringFunc(s, func(ref string) string {
		m := varRef.FindStringSubmatch(ref)
		name := m[1] + m[2]
		v, ok := vars[name]
		if !ok {
			missing = append(missing, name)
		}
		return v
	})
	if len(missing) > 0 {
		return "", fmt.Errorf("%q: %s not set", s, strings.Join(missing, ", "))
	}
	return out, nil
}
