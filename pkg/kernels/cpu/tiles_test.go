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
