package safetensors

import (
	"encoding/binary"
	"errors"
	"math"
	"os"
	"path/filepath"
	"testing"
)

func TestWriterErrors(t *testing.T) {
	dir := t.TempDir()
	hs := []Header{{"a", F32, []int{2}}, {"b", BF16, []int{3}}} // 8 + 6 bytes

	t.Run("too many bytes", func(t *testing.T) {
		p := filepath.Join(dir, "over.safetensors")
		w, err := Create(p, hs, nil)
		if err != nil {
			t.Fatal(err)
		}
		if n, err := w.Write(make([]byte, 10)); n != 10 || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
		n, err := w.Write(make([]byte, 5))
		if n != 0 {
			t.Errorf("over-long Write wrote %d bytes", n)
		}
		wantErr(t, err, "over.safetensors", "exceeds the declared data size")
		_, err = w.Write(make([]byte, 1)) // errors are sticky
		wantErr(t, err, "over.safetensors")
		wantErr(t, w.Close(), "over.safetensors")
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Error("failed file not removed")
		}
	})
	t.Run("too few bytes", func(t *testing.T) {
		p := filepath.Join(dir, "short.safetensors")
		w, err := Create(p, hs, nil)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(make([]byte, 9))
		err = w.Close()
		wantErr(t, err, "short.safetensors", `tensor "b"`, "only 9 of 14")
		if err2 := w.Close(); err2 != err {
			t.Errorf("second Close = %v, want %v", err2, err)
		}
		if _, err := w.Write([]byte{1}); err == nil {
			t.Error("Write after Close succeeded")
		}
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Error("incomplete file not removed")
		}
	})
	for _, tc := range []struct {
		name    string
		hs      []Header
		meta    map[string]string
		tensor  string
		message string
	}{
		{"duplicate name", []Header{{"a", F32, nil}, {"a", F16, nil}}, nil, "a", "twice"},
		{"reserved name", []Header{{"__metadata__", F32, nil}}, nil, "__metadata__", "reserved"},
		{"invalid dtype", []Header{{"x", DType(0), []int{1}}}, nil, "x", "dtype"},
		{"negative dim", []Header{{"x", F32, []int{2, -1}}}, nil, "x", "negative"},
		{"overflow", []Header{{"x", F32, []int{math.MaxInt, math.MaxInt, math.MaxInt}}}, nil, "x", "overflows"},
		{"invalid UTF-8 name", []Header{{"\xff", F32, nil}}, nil, "\xff", "UTF-8"},
		{"invalid UTF-8 metadata", nil, map[string]string{"k": "\xff"}, "", "UTF-8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, "bad.safetensors")
			_, err := Create(p, tc.hs, tc.meta)
			subs := []string{"bad.safetensors", tc.message}
			if tc.tensor != "" && tc.tensor != "\xff" {
				subs = append(subs, `tensor "`+tc.tensor+`"`)
			}
			wantErr(t, err, subs...)
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Error("file created despite the error")
			}
		})
	}
	t.Run("WriteFile wrong data length", func(t *testing.T) {
		p := filepath.Join(dir, "wf.safetensors")
		err := WriteFile(p, []Tensor{{Header{"a", F32, []int{2}}, make([]byte, 8)}, {Header{"b", F32, []int{2}}, make([]byte, 4)}}, nil)
		wantErr(t, err, "wf.safetensors", `tensor "b"`, "4 data bytes")
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Error("failed file not removed")
		}
	})
	t.Run("WriteIndex", func(t *testing.T) {
		wantErr(t, WriteIndex(dir, nil, 0), IndexFile, "empty")
		wantErr(t, WriteIndex(dir, map[string]string{"w": "../x.safetensors"}, 4), IndexFile, `tensor "w"`)
		wantErr(t, WriteIndex(dir, map[string]string{"w": "x.safetensors"}, -1), IndexFile, "negative")
		wantErr(t, WriteIndex(filepath.Join(dir, "nodir"), map[string]string{"w": "x.safetensors"}, 4), IndexFile)
	})
}

// TestCreateLarge streams a checkpoint bigger than the write buffer and
// checks its layout without holding it in memory twice.
func TestCreateLarge(t *testing.T) {
	p := filepath.Join(t.TempDir(), "large.safetensors")
	hs := []Header{{"big", BF16, []int{1024, 1536}}, {"small", F32, []int{3}}} // 3 MiB + 12
	w, err := Create(p, hs, map[string]string{"format": "pt"})
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 4096)
	for i := 0; i < 1024*1536*2/len(chunk); i++ {
		binary.LittleEndian.PutUint32(chunk, uint32(i))
		if _, err := w.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	w.Write(EncodeFloat32(F32, []float32{1, 2, 3}))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	c := mustOpen(t, p, Options{})
	row, err := c.ReadRows("big", 1000, 1001) // bytes [1000*3072, 1001*3072): chunk 750
	if err != nil {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint32(row) != 750 || c.BytesRead() != 3072 {
		t.Errorf("row 1000 starts with %d, %d bytes read", binary.LittleEndian.Uint32(row), c.BytesRead())
	}
	f, err := c.ReadFloat32("small")
	if err != nil || f[2] != 3 {
		t.Errorf("small = %v, %v", f, err)
	}
}
