package cpu

import "testing"

// TestPlanTiles: tilings cover every row once, in order, leave at most 3
// rows to the one-row kernel, and waste little padding.
func TestPlanTiles(t *testing.T) {
	for _, has8 := range []bool{false, true} {
		for T := 1; T <= 600; T++ {
			p := planTiles(T, has8)
			row := 0
			for _, s := range p.tiles {
				if s.row != row || (s.mr != packMR && s.mr != 8) || (s.mr == 8 && !has8) {
					t.Fatalf("T=%d has8=%v: tile %+v after row %d", T, has8, s, row)
				}
				row = min(T, s.row+s.mr)
			}
			if row != p.rows || T-row > 3 || T-row < 0 {
				t.Fatalf("T=%d has8=%v: tiles end at %d, one-row rows from %d", T, has8, row, p.rows)
			}
		}
	}
	if p := planTiles(32, true); len(p.tiles) != 4 || p.tiles[3].mr != 8 {
		t.Fatalf("32 rows: %+v, want four 8-row tiles", p.tiles)
	}
	if p := planTiles(512, true); p.tiles[0].mr != packMR {
		t.Fatalf("512 rows start with %+v, want 14-row tiles", p.tiles[0])
	}
}

// TestSoftmaxLanes: the SIMD softmax pieces against expf and plain loops.
func TestSoftmaxLanes(t *testing.T) {
	for _, k := range simdKernels() {
		if k.expSum16 == nil {
			continue
		}
		s := make([]float32, 0, 2000)
		for x := float32(-100); x < 0.5; x += 0.05 {
			s = append(s, x)
		}
		scaled := append([]float32(nil), s...)
		m := [16]float32{}
		for i := range m {
			m[i] = -1e30
		}
		n := k.scaleMax16(scaled, 0.5, &m)
		var want float32 = -1e30
		for j := 0; j < n; j++ {
			if scaled[j] != s[j]*0.5 {
				t.Fatalf("%s: scaled[%d] = %v, want %v", k.name, j, scaled[j], s[j]*0.5)
			}
			want = max(want, s[j]*0.5)
		}
		got := m[0]
		for _, v := range m {
			got = max(got, v)
		}
		if got != want || n != len(s)&^15 {
			t.Fatalf("%s: max %v over %d, want %v over %d", k.name, got, n, want, len(s)&^15)
		}
		e := append([]float32(nil), s...)
		var sum [16]float32
		n = k.expSum16(e, 0.25, &sum)
		var total, wantTotal float64
		for j := 0; j < n; j++ {
			ref := expf(s[j] - 0.25)
			if d := abs32(e[j] - ref); d > 4e-7*ref {
				t.Fatalf("%s: exp(%v) = %v, expf %v", k.name, s[j]-0.25, e[j], ref)
			}
			wantTotal += float64(ref)
		}
		for _, v := range sum {
			total += float64(v)
		}
		if d := total - wantTotal; d > 1e-5*wantTotal || d < -1e-5*wantTotal {
			t.Fatalf("%s: sum %v, want %v", k.name, total, wantTotal)
		}
	}
}
