package openmetrics

import (
	"math"
	"testing"
)

func TestFormats(t *testing.T) {
	write := func(om bool) string {
		w := NewWriter(om)
		w.Counter("x_restarts", "Restarts.")
		w.Sample(3, Label{"app", `we"b\` + "\n"}, Label{"cause", "crashed"})
		w.Gauge("x_up", "Up.")
		w.Sample(1)
		w.Sample(math.NaN(), Label{"bad", "\xff"})
		return string(w.Bytes())
	}
	text := "# HELP x_restarts_total Restarts.\n# TYPE x_restarts_total counter\n" +
		"x_restarts_total{app=\"we\\\"b\\\\\\n\",cause=\"crashed\"} 3\n" +
		"# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\nx_up{bad=\"\uFFFD\"} NaN\n"
	if got := write(false); got != text {
		t.Errorf("text format:\n%s\nwant\n%s", got, text)
	}
	om := "# HELP x_restarts Restarts.\n# TYPE x_restarts counter\n" +
		"x_restarts_total{app=\"we\\\"b\\\\\\n\",cause=\"crashed\"} 3\n" +
		"# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\nx_up{bad=\"\uFFFD\"} NaN\n# EOF\n"
	if got := write(true); got != om {
		t.Errorf("OpenMetrics:\n%s\nwant\n%s", got, om)
	}
}

func TestNames(t *testing.T) {
	for _, name := range []string{"", "1x", "x_total", "x-y", "x y"} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("family name %q accepted", name)
				}
			}()
			NewWriter(false).Gauge(name, "")
		}()
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("label __name__ accepted")
			}
		}()
		w := NewWriter(false)
		w.Gauge("x", "")
		w.Sample(1, Label{"__name__", "y"})
	}()
}

func TestNumber(t *testing.T) {
	for v, want := range map[float64]string{0: "0", 1e6: "1e+06", 0.25: "0.25", math.Inf(1): "+Inf", math.Inf(-1): "-Inf", 123456789: "1.23456789e+08"} {
		if got := Number(v); got != want {
			t.Errorf("Number(%v) = %q, want %q", v, got, want)
		}
	}
}

func TestWantsOpenMetrics(t *testing.T) {
	prom := "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
	if !WantsOpenMetrics(prom) || WantsOpenMetrics("") || WantsOpenMetrics("text/plain") {
		t.Error("negotiation")
	}
}
