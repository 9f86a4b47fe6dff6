package appfile

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
)

// TestParseRefusesShapes: each shape that makes the TOML decoder slow is
// refused at its place, quickly. On 57c59ff the nested inline tables alone
// took over a second and the dotted key over a minute.
func TestParseRefusesShapes(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want string
	}{
		{"nested inline tables", "a = " + strings.Repeat("{b=", 8000) + "1" + strings.Repeat("}", 8000) + "\n",
			"/etc/cohort/web.toml:1:53: arrays and inline tables nested more than 16 deep"},
		{"nested arrays", "command = [\"/bin/x\"]\n\n  a = " + strings.Repeat("[", 32000) + strings.Repeat("]", 32000) + "\n",
			"/etc/cohort/web.toml:3:23: arrays and inline tables nested more than 16 deep"},
		{"dotted key", strings.Repeat("a.", 20000) + "a = 1\n",
			"/etc/cohort/web.toml:1:32: dotted key or table name with more than 16 parts"},
		{"table header", "[" + strings.Repeat("a.", 20000) + "a]\n",
			"/etc/cohort/web.toml:1:33: dotted key or table name with more than 16 parts"},
		{"many keys", manyKeys(MaxValues + 1),
			fmt.Sprintf("/etc/cohort/web.toml:%d:3: more than 10000 keys, table headers and array items in one file", MaxValues+1)},
		{"long array", "a = [" + strings.Repeat("1,", MaxValues+5) + "]\n",
			"/etc/cohort/web.toml:1:20003: more than 10000 keys, table headers and array items in one file"},
		{"nesting after a multi-line string", "s = '''\n[[[[[[[[[[[[[[[[[[\n'''\nt = \"{{{{\\\"\"\n" +
			"a = [[[[[[[[[[[[[[[[[\n",
			"/etc/cohort/web.toml:5:21: arrays and inline tables nested more than 16 deep"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			_, err := Parse("/etc/cohort/web.toml", []byte(tt.src))
			// On 57c59ff these took from 28 s to over 10 min; the
			// bound leaves room for a busy machine.
			if elapsed := time.Since(start); elapsed > 2*time.Second {
				t.Errorf("took %v", elapsed)
			}
			if err == nil || err.Error() != tt.want {
				t.Errorf("got  %v\nwant %s", err, tt.want)
			}
		})
	}
}

// manyKeys is n lines "k = 1": the shape check runs before the decoder
// would notice the duplicates.
func manyKeys(n int) string { return strings.Repeat("k = 1\n", n) }

// TestShapeLimitsAreExact: MaxNesting and MaxKeyParts are accepted, one
// more is not, whatever strings and comments hold.
func TestShapeLimitsAreExact(t *testing.T) {
	nest := func(n int) string {
		return "a = " + strings.Repeat("[", n) + strings.Repeat("]", n) + " # ]]]]\n" +
			"b = { c = " + strings.Repeat("[", n-1) + "'{{{{'" + strings.Repeat("]", n-1) + " }\n"
	}
	parts := func(n int) string {
		return "[" + strings.Repeat("t.", n-1) + "t]\n" + strings.Repeat("\"k.k\".", n-1) + "k = \"a.b.c.d\"\n"
	}
	for _, tt := range []struct {
		src string
		ok  bool
	}{
		{nest(MaxNesting), true}, {nest(MaxNesting + 1), false},
		{parts(MaxKeyParts), true}, {parts(MaxKeyParts + 1), false},
		{manyKeys(MaxValues), true}, {manyKeys(MaxValues + 1), false},
	} {
		err := checkShape("f.toml", []byte(tt.src))
		if (err == nil) != tt.ok {
			t.Errorf("checkShape(%.60q…) = %v, want ok=%v", tt.src, err, tt.ok)
		}
	}
}

// FuzzCheckShape: the shape check never panics, reports positions inside
// the file, and what it accepts and the TOML decoder also accepts is no
// deeper than the limits allow (a check that lost track of strings or
// brackets would let deeper documents through).
func FuzzCheckShape(f *testing.F) {
	f.Add([]byte(minimal))
	f.Add([]byte("a = [[1, 2], {b = [3]}]\n[t.u.'v.w']\n\"x.y\".z = \"\"\"\n[[[\"\"\"\n"))
	f.Add([]byte("s = '''\n{{{{'''\n# [[[[\nb = \"\\\"[[\"\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		err := checkShape("f.toml", data)
		if err != nil {
			lines := 1 + strings.Count(string(data), "\n")
			if err.Line < 1 || err.Line > lines || err.Col < 1 {
				t.Fatalf("error outside the file (%d lines): %v", lines, err)
			}
			return
		}
		var raw map[string]any
		if _, derr := toml.Decode(string(data), &raw); derr != nil {
			var pe toml.ParseError
			if !errors.As(derr, &pe) {
				t.Logf("decoder error: %v", derr)
			}
			return
		}
		// Table headers and dotted keys each add up to MaxKeyParts
		// levels of tables; arrays and inline tables MaxNesting more.
		if d := treeDepth(raw); d > 2*MaxKeyParts+MaxNesting {
			t.Fatalf("accepted a document %d levels deep", d)
		}
	})
}

func treeDepth(v any) int {
	deepest := 0
	switch val := v.(type) {
	case map[string]any:
		for _, x := range val {
			deepest = max(deepest, treeDepth(x))
		}
	case []map[string]any:
		for _, x := range val {
			deepest = max(deepest, treeDepth(x))
		}
	case []any:
		for _, x := range val {
			deepest = max(deepest, treeDepth(x))
		}
	default:
		return 0
	}
	return deepest + 1
}
