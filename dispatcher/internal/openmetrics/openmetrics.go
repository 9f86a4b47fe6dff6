// Package openmetrics writes metrics in the two text formats Prometheus
// scrapes: OpenMetrics 1.0.0 (what Prometheus asks for first) and the
// Prometheus text format 0.0.4 (what everything else reads, promtool
// included). The two differ in little: a counter's TYPE line names the
// family without its _total suffix in OpenMetrics, and an OpenMetrics
// exposition ends with "# EOF".
//
// Hand-written rather than github.com/prometheus/client_golang or
// prometheus/common/expfmt: the dispatcher exports a fixed set of
// families built afresh from one status snapshot per scrape, so a
// registry of collectors (client_golang's model, a process-wide default
// registry unless avoided) has nothing to keep, and expfmt's encoders
// take client_model's protobuf types, which would bring protobuf into a
// supervisor that otherwise needs none. What the format asks of a writer
// is small and is all here: name and label rules, escaping, counter
// suffixes, number syntax. The output is checked by promtool and by a
// real Prometheus server scraping both formats (the dispatcher's tests).
package openmetrics

import (
	"bytes"
	"math"
	"regexp"
	"strconv"
	"strings"
)

// Content types of the two formats.
const (
	ContentTypeOpenMetrics = "application/openmetrics-text; version=1.0.0; charset=utf-8"
	ContentTypeText        = "text/plain; version=0.0.4; charset=utf-8"
)

// WantsOpenMetrics says whether a scraper's Accept header asks for
// OpenMetrics; otherwise it gets the 0.0.4 text format, which every
// scraper reads.
func WantsOpenMetrics(accept string) bool {
	return strings.Contains(accept, "application/openmetrics-text")
}

// Label is one label of a sample.
type Label struct {
	Name, Value string
}

// Writer builds one exposition in memory. Families are written in the
// order they are begun; a family's samples follow it. Names must be
// valid metric and label names (a constant in the caller): an invalid
// one panics, a programming error that tests catch.
type Writer struct {
	b       bytes.Buffer
	om      bool
	name    string // the current family's
	counter bool
	seen    map[string]bool
}

// NewWriter starts an exposition in OpenMetrics when om is set, else in
// the 0.0.4 text format.
func NewWriter(om bool) *Writer {
	return &Writer{om: om, seen: map[string]bool{}}
}

// ContentType is the Content-Type of what w writes.
func (w *Writer) ContentType() string {
	if w.om {
		return ContentTypeOpenMetrics
	}
	return ContentTypeText
}

var (
	nameRE  = regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`)
	labelRE = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)
)

// Gauge begins a gauge family.
func (w *Writer) Gauge(name, help string) { w.family(name, "gauge", help, false) }

// Counter begins a counter family: name without "_total", which its
// samples get.
func (w *Writer) Counter(name, help string) { w.family(name, "counter", help, true) }

func (w *Writer) family(name, typ, help string, counter bool) {
	if !nameRE.MatchString(name) || strings.HasSuffix(name, "_total") || w.seen[name] {
		panic("openmetrics: bad or repeated family name " + strconv.Quote(name))
	}
	w.seen[name] = true
	w.name, w.counter = name, counter
	typeName := name
	if counter && !w.om {
		typeName += "_total"
	}
	w.b.WriteString("# HELP ")
	w.b.WriteString(typeName)
	w.b.WriteByte(' ')
	w.b.WriteString(escape(help, false))
	w.b.WriteString("\n# TYPE ")
	w.b.WriteString(typeName)
	w.b.WriteByte(' ')
	w.b.WriteString(typ)
	w.b.WriteByte('\n')
}

// Sample writes one sample of the current family.
func (w *Writer) Sample(v float64, labels ...Label) {
	if w.name == "" {
		panic("openmetrics: sample before a family")
	}
	w.b.WriteString(w.name)
	if w.counter {
		w.b.WriteString("_total")
	}
	if len(labels) > 0 {
		w.b.WriteByte('{')
		for i, l := range labels {
			if !labelRE.MatchString(l.Name) || strings.HasPrefix(l.Name, "__") {
				panic("openmetrics: bad label name " + strconv.Quote(l.Name))
			}
			if i > 0 {
				w.b.WriteByte(',')
			}
			w.b.WriteString(l.Name)
			w.b.WriteString(`="`)
			w.b.WriteString(escape(l.Value, true))
			w.b.WriteByte('"')
		}
		w.b.WriteByte('}')
	}
	w.b.WriteByte(' ')
	w.b.WriteString(Number(v))
	w.b.WriteByte('\n')
}

// Bytes ends the exposition and returns it.
func (w *Writer) Bytes() []byte {
	if w.om {
		w.b.WriteString("# EOF\n")
	}
	return w.b.Bytes()
}

// Number formats v as both formats write numbers: the shortest decimal
// that reads back as v, NaN, +Inf, -Inf.
func Number(v float64) string {
	switch {
	case math.IsNaN(v):
		return "NaN"
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// escape escapes a label value (quote: also '"') or HELP text: a
// backslash, a line end and, in a label value, a double quote. Invalid
// UTF-8 becomes U+FFFD, which both formats require to be valid.
func escape(s string, quote bool) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if !strings.ContainsAny(s, "\\\n\"") {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\\':
			b.WriteString(`\\`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '"' && quote:
			b.WriteString(`\"`)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}
