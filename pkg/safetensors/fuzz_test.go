package safetensors

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"sort"
	"testing"
)

// FuzzParseHeader checks that ParseHeader never panics and that whatever
// it accepts is safe to read: every tensor lies inside the data section,
// has the size its shape and dtype imply, and no two overlap.
func FuzzParseHeader(f *testing.F) {
	seeds := []string{
		`{}`,
		`{"__metadata__":{"format":"pt"}}`,
		`{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}`,
		`{"a":{"dtype":"BF16","shape":[],"data_offsets":[0,2]},"b":{"dtype":"F16","shape":[0,3],"data_offsets":[2,2]}}`,
		`{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}`,
		`{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[10,4]}}`,
		`{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}`,
		`{"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,16]}}`,
		`{"a":{"dtype":"XYZ","shape":[1],"data_offsets":[0,4]}}`,
		`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}`,
		`{"a":null,"__metadata__":{"k":1}}`,
		`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{}}`,
		`[1,2,3]`,
		`{"a":`,
	}
	for _, s := range seeds {
		f.Add([]byte(s), int64(24))
	}
	// Real headers from a fixture and from the writer (small ones: the
	// fuzzer's minimisation of large inputs is slow).
	for _, p := range []string{
		filepath.Join(fixtures, "dense-tied-bf16", "model-00002-of-00002.safetensors"),
	} {
		if h, dataLen, ok := readHeader(p); ok {
			f.Add(h, dataLen)
		}
	}
	p := filepath.Join(f.TempDir(), "w.safetensors")
	if err := WriteFile(p, roundTripTensors(newRand(5)), map[string]string{"format": "pt"}); err == nil {
		if h, dataLen, ok := readHeader(p); ok {
			f.Add(h, dataLen)
		}
	}

	f.Fuzz(func(t *testing.T, header []byte, dataLen int64) {
		tensors, _, err := ParseHeader("fuzz.safetensors", header, dataLen)
		if err != nil {
			if tensors != nil {
				t.Fatal("tensors returned with an error")
			}
			return
		}
		type span struct{ begin, end int64 }
		var spans []span
		base := int64(8 + len(header))
		for name, ti := range tensors {
			if ti.Name != name || !ti.DType.Valid() {
				t.Fatalf("bad info %+v", ti)
			}
			for _, d := range ti.Shape {
				if d < 0 {
					t.Fatalf("%q: negative dim in %v", name, ti.Shape)
				}
			}
			begin := ti.Offset - base
			if begin < 0 || ti.Size < 0 || begin+ti.Size > dataLen {
				t.Fatalf("%q: [%d, +%d) outside data section of %d", name, begin, ti.Size, dataLen)
			}
			if ti.Size != ti.NumElements()*int64(ti.DType.Size()) {
				t.Fatalf("%q: size %d for shape %v %v", name, ti.Size, ti.Shape, ti.DType)
			}
			if rows, rowBytes, ok := ti.rowsAndRowBytes(); ok && rows*rowBytes != ti.Size {
				t.Fatalf("%q: %d rows of %d bytes != %d", name, rows, rowBytes, ti.Size)
			}
			if ti.Size > 0 {
				spans = append(spans, span{begin, begin + ti.Size})
			}
		}
		sort.Slice(spans, func(i, j int) bool { return spans[i].begin < spans[j].begin })
		for i := 1; i < len(spans); i++ {
			if spans[i].begin < spans[i-1].end {
				t.Fatalf("overlap: %v and %v", spans[i-1], spans[i])
			}
		}
	})
}

// readHeader returns the header bytes and data length of a file.
func readHeader(path string) ([]byte, int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil || len(b) < 8 {
		return nil, 0, false
	}
	n := binary.LittleEndian.Uint64(b)
	if n > uint64(len(b)-8) {
		return nil, 0, false
	}
	return b[8 : 8+n], int64(len(b)) - 8 - int64(n), true
}
