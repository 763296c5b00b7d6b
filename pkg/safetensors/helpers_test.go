package safetensors

import (
	"encoding/binary"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// rawFile assembles a safetensors file from a header string and dataLen
// bytes of data (bytes 0, 1, 2, ...).
func rawFile(header string, dataLen int) []byte {
	b := make([]byte, 8, 8+len(header)+dataLen)
	binary.LittleEndian.PutUint64(b, uint64(len(header)))
	b = append(b, header...)
	for i := 0; i < dataLen; i++ {
		b = append(b, byte(i))
	}
	return b
}

func writeBytes(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	rng.Read(b)
	return b
}

// wantErr checks that err is non-nil and mentions every substring.
func wantErr(t testing.TB, err error, subs ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one mentioning %q", subs)
	}
	for _, s := range subs {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
}

// bothModes runs f with and without Mmap.
func bothModes(t *testing.T, f func(t *testing.T, opts Options)) {
	for _, mm := range []bool{false, true} {
		name := "copy"
		if mm {
			name = "mmap"
		}
		t.Run(name, func(t *testing.T) { f(t, Options{Mmap: mm}) })
	}
}

func mustOpen(t testing.TB, path string, opts Options) *Checkpoint {
	t.Helper()
	c, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newRand(seed int64) *rand.Rand { return rand.New(rand.NewSource(seed)) }
