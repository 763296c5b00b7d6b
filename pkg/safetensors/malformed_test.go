package safetensors

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestMalformedFiles opens hostile or broken files; each must fail with an
// *Error naming the file and, where one is involved, the tensor.
func TestMalformedFiles(t *testing.T) {
	const file = "model-00002-of-00002.safetensors"
	lenOnly := func(n uint64, total int) []byte {
		b := make([]byte, total)
		binary.LittleEndian.PutUint64(b, n)
		return b
	}
	// entry builds a one-tensor header.
	entry := func(body string) string { return `{"model.norm.weight":` + body + `}` }
	good := `{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}`
	for _, tc := range []struct {
		name   string
		data   []byte
		tensor string // "" when no tensor is involved
		msg    string // further substring expected
	}{
		{"empty file", nil, "", "shorter than"},
		{"shorter than 8 bytes", []byte{1, 0, 0}, "", "shorter than"},
		{"header length beyond file", lenOnly(100, 50), "", "exceeds the 42 bytes"},
		{"header length beyond limit", lenOnly(200_000_000, 16), "", "limit"},
		{"header length huge", lenOnly(1<<63+5, 16), "", "limit"},
		{"invalid JSON", rawFile(`{"a":`, 0), "", "not valid JSON"},
		{"invalid JSON garbage", rawFile(`xyz`, 0), "", "not valid JSON"},
		{"empty header", rawFile(``, 0), "", "not valid JSON"},
		{"header is an array", rawFile(`[1,2]`, 0), "", "not a JSON object"},
		{"header is a string", rawFile(`"abc"`, 0), "", "not a JSON object"},
		{"header is null", rawFile(`null`, 0), "", "not a JSON object"},
		{"trailing data", rawFile(`{} {}`, 0), "", "trailing"},
		{"invalid UTF-8", rawFile("{\"\xff\":1}", 0), "", "UTF-8"},
		{"duplicate tensor", rawFile(`{"w":`+good+`,"w":`+good+`}`, 16), "", "duplicate"},
		{"entry is a number", rawFile(entry(`5`), 0), "model.norm.weight", "not a JSON object"},
		{"entry is null", rawFile(entry(`null`), 0), "model.norm.weight", "not a JSON object"},
		{"entry is an array", rawFile(entry(`[1]`), 0), "model.norm.weight", "not a JSON object"},
		{"missing dtype", rawFile(entry(`{"shape":[2,2],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"dtype"`},
		{"missing shape", rawFile(entry(`{"dtype":"F32","data_offsets":[0,16]}`), 16), "model.norm.weight", `"shape"`},
		{"missing data_offsets", rawFile(entry(`{"dtype":"F32","shape":[2,2]}`), 16), "model.norm.weight", `"data_offsets"`},
		{"dtype not a string", rawFile(entry(`{"dtype":4,"shape":[2,2],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"dtype"`},
		{"dtype null", rawFile(entry(`{"dtype":null,"shape":[2,2],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"dtype"`},
		{"unknown dtype", rawFile(entry(`{"dtype":"XYZ","shape":[2,2],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"XYZ"`},
		{"unsupported dtype I64", rawFile(entry(`{"dtype":"I64","shape":[2],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"I64"`},
		{"unsupported dtype F8_E4M3", rawFile(entry(`{"dtype":"F8_E4M3","shape":[16],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"F8_E4M3"`},
		{"shape not an array", rawFile(entry(`{"dtype":"F32","shape":"2x2","data_offsets":[0,16]}`), 16), "model.norm.weight", `"shape"`},
		{"shape null", rawFile(entry(`{"dtype":"F32","shape":null,"data_offsets":[0,16]}`), 16), "model.norm.weight", `"shape"`},
		{"shape of strings", rawFile(entry(`{"dtype":"F32","shape":["2",2],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"shape"`},
		{"shape fractional", rawFile(entry(`{"dtype":"F32","shape":[2.5,2],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"shape"`},
		{"shape exponent", rawFile(entry(`{"dtype":"F32","shape":[2e0,2],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"shape"`},
		{"shape nested", rawFile(entry(`{"dtype":"F32","shape":[[2],2],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"shape"`},
		{"shape beyond int64", rawFile(entry(`{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,16]}`), 16), "model.norm.weight", `"shape"`},
		{"shape too many dims", rawFile(entry(`{"dtype":"F32","shape":[`+strings.Repeat("1,", 100)+`1],"data_offsets":[0,4]}`), 4), "model.norm.weight", `"shape"`},
		{"negative dim", rawFile(entry(`{"dtype":"F32","shape":[-2,-2],"data_offsets":[0,16]}`), 16), "model.norm.weight", "negative dimension"},
		{"element count overflows", rawFile(entry(`{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,16]}`), 16), "model.norm.weight", "overflows"},
		{"element count overflows beside zero", rawFile(entry(`{"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}`), 16), "model.norm.weight", "overflows"},
		{"byte size overflows", rawFile(entry(`{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,16]}`), 16), "model.norm.weight", "overflows"},
		{"data_offsets one element", rawFile(entry(`{"dtype":"F32","shape":[2,2],"data_offsets":[16]}`), 16), "model.norm.weight", `"data_offsets"`},
		{"data_offsets three elements", rawFile(entry(`{"dtype":"F32","shape":[2,2],"data_offsets":[0,16,32]}`), 32), "model.norm.weight", `"data_offsets"`},
		{"data_offsets not an array", rawFile(entry(`{"dtype":"F32","shape":[2,2],"data_offsets":{"0":16}}`), 16), "model.norm.weight", `"data_offsets"`},
		{"data_offsets fractional", rawFile(entry(`{"dtype":"F32","shape":[2,2],"data_offsets":[0,16.0]}`), 16), "model.norm.weight", `"data_offsets"`},
		{"data_offsets negative", rawFile(entry(`{"dtype":"F32","shape":[2,2],"data_offsets":[-16,0]}`), 16), "model.norm.weight", "negative"},
		{"data_offsets inverted", rawFile(entry(`{"dtype":"F32","shape":[2,2],"data_offsets":[10,4]}`), 16), "model.norm.weight", "data_offsets [10, 4] inverted"},
		{"data_offsets beyond data", rawFile(entry(`{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}`), 16), "model.norm.weight", "beyond the data section of 16 bytes"},
		{"data_offsets beyond int64", rawFile(entry(`{"dtype":"F32","shape":[2,2],"data_offsets":[0,18446744073709551616]}`), 16), "model.norm.weight", `"data_offsets"`},
		{"size mismatch", rawFile(entry(`{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}`), 16), "model.norm.weight", "needs 16 bytes"},
		{"size mismatch dtype", rawFile(entry(`{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}`), 16), "model.norm.weight", "needs 8 bytes"},
		{"overlap", rawFile(`{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}`, 24), "b", `overlap tensor "a"`},
		{"overlap contained", rawFile(`{"a":{"dtype":"F32","shape":[8],"data_offsets":[0,32]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}`, 32), "b", `overlap tensor "a"`},
		{"overlap identical", rawFile(`{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}}`, 8), "b", `overlap tensor "a"`},
		{"metadata not an object", rawFile(`{"__metadata__":"pt"}`, 0), "", "__metadata__"},
		{"metadata null", rawFile(`{"__metadata__":null}`, 0), "", "__metadata__"},
		{"metadata value not a string", rawFile(`{"__metadata__":{"format":1}}`, 0), "", "__metadata__"},
		{"metadata nested", rawFile(`{"__metadata__":{"format":{"a":"b"}}}`, 0), "", "__metadata__"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), file)
			writeBytes(t, path, tc.data)
			for _, mm := range []bool{false, true} {
				c, err := Open(path, Options{Mmap: mm})
				if c != nil {
					c.Close()
					t.Fatal("Open returned a Checkpoint with an error")
				}
				subs := []string{"safetensors: ", file, tc.msg}
				if tc.tensor != "" {
					subs = append(subs, `tensor "`+tc.tensor+`"`)
				} else if err != nil && strings.Contains(err.Error(), "tensor \"") {
					t.Errorf("error %q names a tensor", err)
				}
				wantErr(t, err, subs...)
				if !mm {
					t.Log(err)
				}
				var se *Error
				if !errors.As(err, &se) || se.File != path || se.Tensor != tc.tensor {
					t.Errorf("error %#v: want *Error with File %q Tensor %q", err, path, tc.tensor)
				}
			}
			// ParseHeader directly gives the same verdict.
			if len(tc.data) >= 8 {
				n := binary.LittleEndian.Uint64(tc.data)
				if n <= uint64(len(tc.data)-8) {
					_, _, err := ParseHeader(file, tc.data[8:8+n], int64(len(tc.data)-8-int(n)))
					wantErr(t, err, file, tc.msg)
				}
			}
		})
	}
}

// TestValidEdgeHeaders covers headers that are unusual but valid.
func TestValidEdgeHeaders(t *testing.T) {
	for _, tc := range []struct {
		name    string
		header  string
		dataLen int64
		n       int
	}{
		{"empty object", `{}`, 0, 0},
		{"whitespace padding", "{}        ", 0, 0},
		{"metadata only", `{"__metadata__":{}}`, 0, 0},
		{"gap between tensors and trailing bytes", `{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"b":{"dtype":"F16","shape":[1],"data_offsets":[12,14]}}`, 20, 2},
		{"zero-size inside another", `{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}`, 16, 2},
		{"zero-size at end", `{"a":{"dtype":"F32","shape":[3,0],"data_offsets":[0,0]}}`, 0, 1},
		{"scalar", `{"s":{"dtype":"BF16","shape":[],"data_offsets":[0,2]}}`, 2, 1},
		{"extra keys ignored", `{"s":{"dtype":"BF16","shape":[1],"data_offsets":[0,2],"extra":true}}`, 2, 1},
		{"empty name", `{"":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}`, 2, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts, _, err := ParseHeader("x.safetensors", []byte(tc.header), tc.dataLen)
			if err != nil {
				t.Fatal(err)
			}
			if len(ts) != tc.n {
				t.Errorf("%d tensors, want %d", len(ts), tc.n)
			}
			for name, ti := range ts {
				if ti.Name != name || ti.File != "x.safetensors" || ti.Offset < int64(8+len(tc.header)) {
					t.Errorf("%+v", ti)
				}
			}
		})
	}
	// Offsets are absolute.
	h := `{"__metadata__":{"k":"v"},"b":{"dtype":"F16","shape":[1],"data_offsets":[12,14]}}`
	ts, meta, err := ParseHeader("x", []byte(h), 20)
	if err != nil || meta["k"] != "v" {
		t.Fatal(err, meta)
	}
	if b := ts["b"]; b.Offset != int64(8+len(h)+12) || b.Size != 2 {
		t.Errorf("b = %+v", b)
	}
	if _, _, err := ParseHeader("x", []byte(`{}`), -1); err == nil {
		t.Error("negative dataLen accepted")
	}
}

func TestMalformedIndex(t *testing.T) {
	shard := func(t *testing.T, dir, name string, tensors ...string) {
		var ts []Tensor
		for _, n := range tensors {
			ts = append(ts, Tensor{Header{n, F32, []int{1}}, make([]byte, 4)})
		}
		if err := WriteFile(filepath.Join(dir, name), ts, nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name   string
		index  string
		file   string // file the error must name
		tensor string
		msg    string
	}{
		{"malformed JSON", `{"weight_map": {`, IndexFile, "", "malformed index"},
		{"not an object", `[1]`, IndexFile, "", "malformed index"},
		{"weight_map missing", `{"metadata": {"total_size": 4}}`, IndexFile, "", "weight_map"},
		{"weight_map empty", `{"metadata": {}, "weight_map": {}}`, IndexFile, "", "weight_map"},
		{"weight_map null", `{"weight_map": null}`, IndexFile, "", "weight_map"},
		{"weight_map wrong type", `{"weight_map": {"a": 3}}`, IndexFile, "", "malformed index"},
		{"missing shard", `{"weight_map": {"a": "s1.safetensors", "b": "gone.safetensors"}}`, IndexFile, "", `missing shard "gone.safetensors"`},
		{"tensor absent from shard", `{"weight_map": {"a": "s1.safetensors", "zz": "s1.safetensors"}}`, "s1.safetensors", "zz", "not present"},
		{"path separator", `{"weight_map": {"a": "sub/s1.safetensors"}}`, IndexFile, "a", "separator"},
		{"parent escape", `{"weight_map": {"a": "../s1.safetensors"}}`, IndexFile, "a", "bad shard name"},
		{"dot dot", `{"weight_map": {"a": ".."}}`, IndexFile, "a", `".."`},
		{"backslash", `{"weight_map": {"a": "..\\s1.safetensors"}}`, IndexFile, "a", "bad shard name"},
		{"empty shard name", `{"weight_map": {"a": ""}}`, IndexFile, "a", "bad shard name"},
		{"broken shard", `{"weight_map": {"a": "s1.safetensors", "b": "bad.safetensors"}}`, "bad.safetensors", "", "shorter than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			shard(t, dir, "s1.safetensors", "a", "b")
			os.Mkdir(filepath.Join(dir, "sub"), 0o755)
			shard(t, filepath.Join(dir, "sub"), "s1.safetensors", "a")
			writeBytes(t, filepath.Join(dir, "bad.safetensors"), []byte{1, 2})
			writeBytes(t, filepath.Join(dir, IndexFile), []byte(tc.index))
			c, err := Open(dir, Options{})
			if c != nil {
				c.Close()
			}
			subs := []string{tc.file, tc.msg}
			if tc.tensor != "" {
				subs = append(subs, `tensor "`+tc.tensor+`"`)
			}
			wantErr(t, err, subs...)
			t.Log(err)
		})
	}

	t.Run("no safetensors in directory", func(t *testing.T) {
		dir := t.TempDir()
		writeBytes(t, filepath.Join(dir, "config.json"), []byte("{}"))
		_, err := Open(dir, Options{})
		wantErr(t, err, dir, "no ")
	})
	t.Run("nonexistent path", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "nope.safetensors")
		_, err := Open(p, Options{})
		wantErr(t, err, "nope.safetensors")
		if !errors.Is(err, os.ErrNotExist) {
			t.Errorf("error %v does not wrap ErrNotExist", err)
		}
	})
	t.Run("tensor in two files", func(t *testing.T) {
		dir := t.TempDir()
		shard(t, dir, "a.safetensors", "x", "dup")
		shard(t, dir, "b.safetensors", "y", "dup")
		_, err := Open(dir, Options{Mmap: true})
		wantErr(t, err, "b.safetensors", `tensor "dup"`, "a.safetensors")
	})
	t.Run("bad file among several", func(t *testing.T) {
		dir := t.TempDir()
		shard(t, dir, "a.safetensors", "x")
		writeBytes(t, filepath.Join(dir, "b.safetensors"), rawFile(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}`, 4))
		_, err := Open(dir, Options{})
		wantErr(t, err, "b.safetensors", `tensor "w"`, "inverted")
	})
}
