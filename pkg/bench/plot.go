package bench

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"io"
	"math"
	"strconv"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// The size of the image Plot draws, in pixels.
const (
	PlotWidth  = 1200
	PlotHeight = 900
)

var (
	white  = color.RGBA{255, 255, 255, 255}
	black  = color.RGBA{0, 0, 0, 255}
	grey   = color.RGBA{225, 225, 225, 255}
	blue   = color.RGBA{31, 119, 180, 255}
	orange = color.RGBA{255, 127, 14, 255}
	red    = color.RGBA{214, 39, 40, 255}
)

// WritePNG writes Plot(r) as a PNG.
func WritePNG(w io.Writer, r *Report) error { return png.Encode(w, Plot(r)) }

// Plot draws the report's records in three panels: E2E latency and TTFT of
// every request against its start time (failed requests in red, at the time
// they failed), a histogram of TTFT and one of ITL (completed requests).
// It uses only the Records and Config, so a report read back from JSON
// plots the same.
func Plot(r *Report) *image.RGBA {
	c := canvas{image.NewRGBA(image.Rect(0, 0, PlotWidth, PlotHeight))}
	c.fill(c.img.Bounds(), white)
	cfg := r.Config
	load := fmt.Sprintf("concurrency %d", cfg.Concurrency)
	if cfg.Rate != 0 {
		load = fmt.Sprintf("rate %v req/s", float64(cfg.Rate))
		if cfg.Concurrency > 0 {
			load += fmt.Sprintf(", max concurrency %d", cfg.Concurrency)
		}
	}
	c.text(10, 16, fmt.Sprintf("qwenctl bench %s %s: %d completed, %d failed in %.2f s, %.2f req/s, %.1f output tok/s",
		cfg.Addr, load, r.Completed, r.Failed, r.DurationS, r.RequestThroughput, r.OutputThroughput), black)

	var ttft, itl []float64
	var e2ePts, ttftPts, failPts [][2]float64
	for _, rec := range r.Records {
		switch {
		case rec.Interrupted:
		case rec.Error != "":
			failPts = append(failPts, [2]float64{rec.StartS, rec.E2EMs})
		default:
			e2ePts = append(e2ePts, [2]float64{rec.StartS, rec.E2EMs})
			if rec.TTFTMs != nil {
				ttftPts = append(ttftPts, [2]float64{rec.StartS, *rec.TTFTMs})
				ttft = append(ttft, *rec.TTFTMs)
			}
			itl = append(itl, rec.ITLMs...)
		}
	}

	// Panel 1: latency per request over time.
	xlo, xhi, ylo, yhi := math.Inf(1), math.Inf(-1), 0.0, math.Inf(-1)
	for _, set := range [][][2]float64{e2ePts, ttftPts, failPts} {
		for _, p := range set {
			xlo, xhi, yhi = min(xlo, p[0]), max(xhi, p[0]), max(yhi, p[1])
		}
	}
	a := newAxes(image.Rect(80, 60, PlotWidth-30, 420), xlo, xhi, ylo, 1.05*yhi)
	a.draw(c, "E2E latency and TTFT per request", "request start (s)", "ms")
	for _, s := range []struct {
		pts [][2]float64
		col color.RGBA
	}{{e2ePts, blue}, {ttftPts, orange}, {failPts, red}} {
		for _, p := range s.pts {
			c.fill(image.Rect(a.px(p[0])-2, a.py(p[1])-2, a.px(p[0])+3, a.py(p[1])+3), s.col)
		}
	}
	lx, ly := a.area.Max.X-120, a.area.Min.Y+10
	for i, l := range []struct {
		name string
		col  color.RGBA
	}{{"E2E", blue}, {"TTFT", orange}, {"failed", red}} {
		c.fill(image.Rect(lx, ly+16*i, lx+10, ly+16*i+10), l.col)
		c.text(lx+16, ly+16*i+10, l.name, black)
	}
	if len(e2ePts)+len(failPts) == 0 {
		a.noData(c)
	}

	histogram(c, image.Rect(80, 510, PlotWidth/2-30, PlotHeight-50), "TTFT", "requests", ttft, orange)
	histogram(c, image.Rect(PlotWidth/2+70, 510, PlotWidth-30, PlotHeight-50), "ITL", "tokens", itl, blue)
	return c.img
}

// histogram draws vs (ms) in about sqrt(n) bins (5 to 40) over area.
func histogram(c canvas, area image.Rectangle, name, unit string, vs []float64, col color.RGBA) {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, v := range vs {
		lo, hi = min(lo, v), max(hi, v)
	}
	if len(vs) == 0 {
		lo, hi = 0, 1
	}
	if hi == lo {
		lo, hi = lo-0.5, hi+0.5
	}
	bins := make([]int, max(5, min(40, int(math.Sqrt(float64(len(vs)))))))
	width := (hi - lo) / float64(len(bins))
	top := 0
	for _, v := range vs {
		i := min(int((v-lo)/width), len(bins)-1)
		bins[i]++
		top = max(top, bins[i])
	}
	a := newAxes(area, lo, hi, 0, 1.05*float64(max(top, 1)))
	s := Describe(vs)
	a.draw(c, fmt.Sprintf("%s histogram (n=%d, median %.2f ms, p99 %.2f ms)", name, len(vs), s.Median, s.P99), name+" (ms)", unit)
	for i, n := range bins {
		if n > 0 {
			x0, x1 := a.px(lo+float64(i)*width), a.px(lo+float64(i+1)*width)
			c.fill(image.Rect(x0+1, a.py(float64(n)), max(x1, x0+2), a.area.Max.Y), col)
		}
	}
	if len(vs) == 0 {
		a.noData(c)
	}
}

// canvas draws filled rectangles and text on an RGBA image.
type canvas struct{ img *image.RGBA }

func (c canvas) fill(r image.Rectangle, col color.RGBA) {
	draw.Draw(c.img, r, image.NewUniform(col), image.Point{}, draw.Src)
}

// text draws s with its baseline at y, starting at x.
func (c canvas) text(x, y int, s string, col color.RGBA) {
	d := font.Drawer{Dst: c.img, Src: image.NewUniform(col), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

func textWidth(s string) int { return font.MeasureString(basicfont.Face7x13, s).Ceil() }

// axes maps data coordinates onto a pixel area, y up.
type axes struct {
	area           image.Rectangle
	x0, x1, y0, y1 float64
	xt, yt         []float64
}

func newAxes(area image.Rectangle, xlo, xhi, ylo, yhi float64) axes {
	if math.IsInf(xlo, 0) || math.IsInf(xhi, 0) {
		xlo, xhi = 0, 1
	}
	if math.IsInf(yhi, 0) {
		yhi = 1
	}
	a := axes{area: area, xt: niceTicks(xlo, xhi, 8), yt: niceTicks(ylo, yhi, 6)}
	a.x0, a.x1 = a.xt[0], a.xt[len(a.xt)-1]
	a.y0, a.y1 = a.yt[0], a.yt[len(a.yt)-1]
	return a
}

func (a axes) px(x float64) int {
	return a.area.Min.X + int(math.Round((x-a.x0)/(a.x1-a.x0)*float64(a.area.Dx())))
}

func (a axes) py(y float64) int {
	return a.area.Max.Y - int(math.Round((y-a.y0)/(a.y1-a.y0)*float64(a.area.Dy())))
}

// draw draws the grid, the frame, tick labels and the titles.
func (a axes) draw(c canvas, title, xlabel, ylabel string) {
	r := a.area
	for _, t := range a.xt {
		x := a.px(t)
		c.fill(image.Rect(x, r.Min.Y, x+1, r.Max.Y), grey)
		c.fill(image.Rect(x, r.Max.Y, x+1, r.Max.Y+5), black)
		l := tickLabel(t, a.xt)
		c.text(x-textWidth(l)/2, r.Max.Y+18, l, black)
	}
	for _, t := range a.yt {
		y := a.py(t)
		c.fill(image.Rect(r.Min.X, y, r.Max.X, y+1), grey)
		c.fill(image.Rect(r.Min.X-5, y, r.Min.X, y+1), black)
		l := tickLabel(t, a.yt)
		c.text(r.Min.X-8-textWidth(l), y+4, l, black)
	}
	c.fill(image.Rect(r.Min.X, r.Min.Y, r.Max.X+1, r.Min.Y+1), black)
	c.fill(image.Rect(r.Min.X, r.Max.Y, r.Max.X+1, r.Max.Y+1), black)
	c.fill(image.Rect(r.Min.X, r.Min.Y, r.Min.X+1, r.Max.Y+1), black)
	c.fill(image.Rect(r.Max.X, r.Min.Y, r.Max.X+1, r.Max.Y+1), black)
	c.text(r.Min.X+(r.Dx()-textWidth(title))/2, r.Min.Y-12, title, black)
	c.text(r.Min.X+(r.Dx()-textWidth(xlabel))/2, r.Max.Y+36, xlabel, black)
	c.text(r.Min.X-8-textWidth(ylabel), r.Min.Y-12, ylabel, black)
}

func (a axes) noData(c canvas) {
	c.text(a.area.Min.X+(a.area.Dx()-textWidth("no data"))/2, a.area.Min.Y+a.area.Dy()/2, "no data", black)
}

// niceTicks covers [lo, hi] with about n ticks at 1, 2 or 5 times a power of
// ten; the first tick is <= lo and the last >= hi.
func niceTicks(lo, hi float64, n int) []float64 {
	if !(hi > lo) {
		lo, hi = lo-1, lo+1
		if lo < 0 && hi-1 >= 0 {
			lo = 0
		}
	}
	raw := (hi - lo) / float64(n)
	pow := math.Pow(10, math.Floor(math.Log10(raw)))
	step := pow * 10
	for _, m := range []float64{1, 2, 5} {
		if m*pow >= raw {
			step = m * pow
			break
		}
	}
	var ts []float64
	for i := math.Floor(lo / step); ; i++ {
		t := i * step
		ts = append(ts, t)
		if t >= hi || len(ts) > 4*n {
			break
		}
	}
	return ts
}

// tickLabel formats t with as many decimals as the tick spacing needs.
func tickLabel(t float64, ticks []float64) string {
	dec := 0
	if len(ticks) > 1 {
		dec = max(0, int(-math.Floor(math.Log10(ticks[1]-ticks[0])+1e-9)))
	}
	return strconv.FormatFloat(t, 'f', dec, 64)
}
