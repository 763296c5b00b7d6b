package units

import "testing"

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "4096": 4096, "512MiB": 512 << 20, "2GiB": 2 << 30, "80GB": 80e9, " 1.5 KiB": 1536, "7B": 7} {
		if got, err := ParseBytes(in); err != nil || got != want {
			t.Errorf("%q: %d %v, want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "abc", "1XB", "NaN", "1e30TB", "GiB"} {
		if _, err := ParseBytes(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}
