package expertparallel_test

import (
	"math"
	"strings"
	"sync"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// reduceAll runs ReduceStage on n in-process ranks; part(r) is rank r's x
// and touched rows.
func reduceAll(t *testing.T, n, H int, part func(r int) ([]float32, []bool)) ([][]float32, []error) {
	t.Helper()
	xs := model.LocalExchangers(n, n)
	out := make([][]float32, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for r := range n {
		wg.Go(func() {
			x, touched := part(r)
			st := &expertparallel.Stage{Exchanger: xs[r], Rank: r, Size: n}
			errs[r] = st.ReduceStage(x, H, touched)
			out[r] = x
		})
	}
	wg.Wait()
	return out, errs
}

// TestReduceStage sums sparse and dense partial rows over 1 to 5 ranks,
// with fewer rows than ranks too: every rank ends with the exact sums.
func TestReduceStage(t *testing.T) {
	const H = 3
	for n := 1; n <= 5; n++ {
		for _, T := range []int{1, 2, 7} {
			val := func(r, row, j int) float32 { return float32(1 + r + 10*row + 100*j) }
			// rank r touches rows with (row+r)%3 != 0; rank 0 touches all.
			got, errs := reduceAll(t, n, H, func(r int) ([]float32, []bool) {
				x := make([]float32, T*H)
				var touched []bool
				if r > 0 {
					touched = make([]bool, T)
				}
				for row := 0; row < T; row++ {
					if r > 0 && (row+r)%3 == 0 {
						continue
					}
					if touched != nil {
						touched[row] = true
					}
					for j := 0; j < H; j++ {
						x[row*H+j] = val(r, row, j)
					}
				}
				return x, touched
			})
			for r := range n {
				if errs[r] != nil {
					t.Fatalf("n=%d T=%d rank %d: %v", n, T, r, errs[r])
				}
				for row := 0; row < T; row++ {
					for j := 0; j < H; j++ {
						var want float32
						for q := 0; q < n; q++ {
							if q == 0 || (row+q)%3 != 0 {
								want += val(q, row, j)
							}
						}
						if g := got[r][row*H+j]; g != want {
							t.Fatalf("n=%d T=%d rank %d row %d: %v, want %v", n, T, r, row, g, want)
						}
					}
				}
			}
		}
	}
}

// badExchanger delivers a malformed part from rank 1.
type badExchanger struct{ part []float32 }

func (b badExchanger) AllReduce([]float32) error { return nil }

func (b badExchanger) AllToAll(send [][]float32) ([][]float32, error) {
	out := make([][]float32, len(send))
	copy(out, send)
	out[1] = b.part
	return out, nil
}

// TestReduceStageRejects checks that malformed parts and arguments are
// errors, not panics.
func TestReduceStageRejects(t *testing.T) {
	bits := func(v int) float32 { return math.Float32frombits(uint32(v)) }
	for _, tc := range []struct {
		name string
		part []float32
		want string
	}{
		{"empty", nil, "empty part"},
		{"short", []float32{bits(1), bits(0)}, "values for 1 rows"},
		{"row outside", []float32{bits(1), bits(3), 1, 2}, "outside"},
		{"huge count", []float32{bits(1 << 30)}, "values for"},
	} {
		st := &expertparallel.Stage{Exchanger: badExchanger{tc.part}, Rank: 0, Size: 2}
		err := st.ReduceStage(make([]float32, 4*2), 2, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	st := &expertparallel.Stage{Exchanger: badExchanger{}, Rank: 0, Size: 2}
	if err := st.ReduceStage(make([]float32, 5), 2, nil); err == nil {
		t.Error("5 values of width 2 accepted")
	}
}
