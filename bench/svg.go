package bench

import (
	"encoding/xml"
	"fmt"
	"strings"
)

// SVG renders requests per second of every throughput row as two bar
// charts side by side, keep-alive and new-conn, each on its own scale (a
// new connection per request is several times slower), with the machine
// and versions underneath. Rows that did not run say why.
func (rep *Report) SVG() string {
	const (
		width  = 960
		labelW = 230 // left column: setup names
		panelW = 355 // one chart, value text included
		valueW = 60  // room for the value right of the longest bar
		rowH   = 24
		top    = 70
	)
	var rows []Row
	for _, r := range rep.Rows {
		if !r.Reload {
			rows = append(rows, r)
		}
	}
	height := top + len(rows)*rowH + 72

	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	p(`<rect width="100%%" height="100%%" fill="#ffffff"/>` + "\n")
	p(`<text x="10" y="22" font-size="16" font-weight="bold">%s</text>`+"\n",
		esc(fmt.Sprintf("Requests per second, hello app, N = %d workers, %d connections (higher is better)", rep.Workers, rep.Conns)))
	for i, r := range rows {
		p(`<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", labelW-8, top+i*rowH+15, esc(r.Name))
	}
	for panel, keep := range []bool{true, false} {
		x0 := labelW + panel*(panelW+15)
		color, title := colorClose, "new connection per request"
		if keep {
			color, title = colorKeep, "keep-alive"
		}
		peak := 1.0
		for _, r := range rows {
			if m := r.get(keep); m.ok() {
				peak = max(peak, m.RPS)
			}
		}
		scale := float64(panelW-valueW) / peak
		p(`<rect x="%d" y="40" width="12" height="12" fill="%s"/><text x="%d" y="50" font-weight="bold">%s</text>`+"\n", x0, color, x0+17, esc(title))
		p(`<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#999999"/>`+"\n", x0, top-4, x0, top+len(rows)*rowH)
		for i, r := range rows {
			y := top + i*rowH
			m := r.get(keep)
			switch {
			case r.NA != "" && panel == 0:
				p(`<text x="%d" y="%d" fill="#777777">%s</text>`+"\n", x0+4, y+15, esc(clip(r.NA, 110)))
			case r.NA != "":
			case !m.ok():
				na := "not measured"
				if m != nil {
					na = m.NA
				}
				p(`<text x="%d" y="%d" fill="#777777" font-size="10">%s</text>`+"\n", x0+4, y+15, esc(clip(na, 55)))
			default:
				w := max(int(m.RPS*scale+0.5), 1)
				p(`<rect x="%d" y="%d" width="%d" height="%d" fill="%s"><title>%s</title></rect>`+"\n",
					x0, y+3, w, rowH-8, color, esc(fmt.Sprintf("%s, %s: %.0f req/s, p99 %s, errors %s", r.Name, workload(keep), m.RPS, ms(m.P99), m.Errors)))
				p(`<text x="%d" y="%d" font-size="11">%.0f</text>`+"\n", x0+w+4, y+15, m.RPS)
			}
		}
	}
	y := top + len(rows)*rowH
	p(`<text x="10" y="%d" font-size="11" fill="#444444">%s</text>`+"\n", y+24, esc("Machine: "+rep.MachineLine()+" · the load generator runs on the same CPUs"))
	p(`<text x="10" y="%d" font-size="11" fill="#444444">%s</text>`+"\n", y+40, esc("Versions: "+rep.VersionLine()+" · "+rep.Date.UTC().Format("2006-01-02")))
	if worst := rep.worstOther(); worst > 0.10 {
		p(`<text x="10" y="%d" font-size="11" fill="#b22222">%s</text>`+"\n", y+56,
			esc(fmt.Sprintf("Measured on a busy machine: other processes used up to %.0f %% of the CPUs during some rows; the figures are noisy.", 100*worst)))
	}
	p("</svg>\n")
	return b.String()
}

// get returns the keep-alive or the new-conn measurement.
func (r Row) get(keep bool) *Measurement {
	if keep {
		return r.KeepAlive
	}
	return r.Close
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
