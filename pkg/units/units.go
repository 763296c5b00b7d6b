// Package units parses the sizes that flags take ("512MiB", "2GiB", "80GB",
// "4096").
package units

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

var suffixes = []struct {
	suffix string
	mult   float64
}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1}}

// ParseBytes reads a non-negative size with an optional binary (KiB…TiB)
// or decimal (KB…TB, B) suffix.
func ParseBytes(s string) (int64, error) {
	num, mult := strings.TrimSpace(s), 1.0
	for _, u := range suffixes {
		if strings.HasSuffix(num, u.suffix) {
			mult, num = u.mult, strings.TrimSpace(strings.TrimSuffix(num, u.suffix))
			break
		}
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 || math.IsNaN(v) || v*mult > 1<<62 {
		return 0, fmt.Errorf("%q is not a size (like 512MiB or 2GiB)", s)
	}
	return int64(v * mult), nil
}
