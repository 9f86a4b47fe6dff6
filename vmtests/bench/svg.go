package bench

import (
	"encoding/xml"
	"fmt"
	"strings"
)

// SVG renders requests per second of every throughput row as a horizontal
// bar chart, keep-alive and new-conn side by side, with the machine and
// versions underneath. Rows that did not run show why.
func (rep *Report) SVG() string {
	const (
		width  = 960
		labelW = 250 // left column: setup names
		valueW = 90  // right of the longest bar: its value
		barH   = 14
		gap    = 12 // between setups
		top    = 64
	)
	var rows []Row
	for _, r := range rep.Rows {
		if !r.Reload {
			rows = append(rows, r)
		}
	}
	peak := 1.0
	for _, r := range rows {
		for _, m := range []*Measurement{r.KeepAlive, r.Close} {
			if m.ok() {
				peak = max(peak, m.RPS)
			}
		}
	}
	scale := float64(width-labelW-valueW-20) / peak
	height := top + len(rows)*(2*barH+gap) + 60

	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	p(`<rect width="100%%" height="100%%" fill="#ffffff"/>` + "\n")
	p(`<text x="10" y="22" font-size="16" font-weight="bold">%s</text>`+"\n",
		esc(fmt.Sprintf("Requests per second, hello app, N = %d workers, %d connections (higher is better)", rep.Workers, rep.Conns)))
	// Legend.
	p(`<rect x="10" y="36" width="12" height="12" fill="%s"/><text x="27" y="46">keep-alive</text>`+"\n", colorKeep)
	p(`<rect x="110" y="36" width="12" height="12" fill="%s"/><text x="127" y="46">new connection per request</text>`+"\n", colorClose)
	y := top
	for _, r := range rows {
		p(`<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", labelW-8, y+barH+4, esc(r.Name))
		if r.NA != "" {
			p(`<text x="%d" y="%d" fill="#777777">%s</text>`+"\n", labelW, y+barH+4, esc(clip(r.NA, 100)))
		}
		for i, m := range []*Measurement{r.KeepAlive, r.Close} {
			by := y + i*barH
			color := colorKeep
			if i == 1 {
				color = colorClose
			}
			switch {
			case r.NA != "":
			case !m.ok():
				na := "not measured"
				if m != nil {
					na = m.NA
				}
				p(`<text x="%d" y="%d" fill="#777777" font-size="10">%s</text>`+"\n", labelW, by+barH-3, esc(clip(na, 100)))
			default:
				w := int(m.RPS*scale + 0.5)
				p(`<rect x="%d" y="%d" width="%d" height="%d" fill="%s"><title>%s</title></rect>`+"\n",
					labelW, by, max(w, 1), barH-2, color, esc(fmt.Sprintf("%s, %s: %.0f req/s, p99 %s", r.Name, workload(i == 0), m.RPS, ms(m.P99))))
				p(`<text x="%d" y="%d" font-size="10">%.0f</text>`+"\n", labelW+w+4, by+barH-3, m.RPS)
			}
		}
		y += 2*barH + gap
	}
	p(`<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#999999"/>`+"\n", labelW, top-4, labelW, y-gap+4)
	p(`<text x="10" y="%d" font-size="11" fill="#444444">%s</text>`+"\n", y+14, esc("Machine: "+rep.MachineLine()))
	p(`<text x="10" y="%d" font-size="11" fill="#444444">%s</text>`+"\n", y+30, esc("Versions: "+rep.VersionLine()+" · load generator on the same CPUs · "+rep.Date.UTC().Format("2006-01-02")))
	p("</svg>\n")
	return b.String()
}

const (
	colorKeep  = "#4e79a7"
	colorClose = "#f28e2b"
)

func esc(s string) string {
	var b strings.Builder
	_ = xml.EscapeText(&b, []byte(s)) // a strings.Builder does not fail
	return b.String()
}

func clip(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}
