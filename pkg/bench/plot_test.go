package bench

import (
	"bytes"
	"image/color"
	"image/png"
	"math"
	"testing"
	"time"
)

func TestWritePNG(t *testing.T) {
	for _, tc := range []struct {
		name string
		rep  *Report
	}{
		{"run", Summarize(Config{Addr: "x:1", Concurrency: 2}, run(), 2*time.Second, nil)},
		{"nothing finished", Summarize(Config{Rate: Rate(math.Inf(1))}, nil, 0, nil)},
		{"one request", Summarize(Config{}, run()[1:2], time.Second, nil)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := WritePNG(&buf, tc.rep); err != nil {
				t.Fatal(err)
			}
			img, err := png.Decode(&buf)
			if err != nil {
				t.Fatal(err)
			}
			if b := img.Bounds(); b.Dx() != PlotWidth || b.Dy() != PlotHeight {
				t.Fatalf("size %v", b)
			}
			colors := map[color.RGBA]int{}
			for y := 0; y < PlotHeight; y++ {
				for x := 0; x < PlotWidth; x++ {
					r, g, b, a := img.At(x, y).RGBA()
					colors[color.RGBA{uint8(r >> 8), uint8(g >> 8), uint8(b >> 8), uint8(a >> 8)}]++
				}
			}
			// Axes and labels are black; the run's points and bars are in their colours.
			if colors[black] < 2000 {
				t.Fatalf("%d black pixels", colors[black])
			}
			if tc.name == "run" && (colors[blue] == 0 || colors[orange] == 0 || colors[red] < 25+100) {
				t.Fatalf("blue %d orange %d red %d pixels", colors[blue], colors[orange], colors[red])
			}
		})
	}
}

func TestNiceTicks(t *testing.T) {
	for _, tc := range []struct {
		lo, hi float64
		n      int
		first  float64
		step   float64
	}{
		{0, 10, 5, 0, 2},
		{3, 97, 8, 0, 20},
		{0.013, 0.049, 6, 0.01, 0.01},
		{0.013, 0.049, 10, 0.01, 0.005},
		{5, 5, 6, 4, 0.5},
		{0, 0, 6, 0, 0.2},
	} {
		ts := niceTicks(tc.lo, tc.hi, tc.n)
		if len(ts) < 2 || !near(ts[0], tc.first, 1e-12) || !near(ts[1]-ts[0], tc.step, 1e-12) || ts[0] > tc.lo || ts[len(ts)-1] < tc.hi {
			t.Errorf("niceTicks(%v, %v, %d) = %v", tc.lo, tc.hi, tc.n, ts)
		}
	}
}
