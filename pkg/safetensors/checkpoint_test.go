package safetensors

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"testing"
)

const fixtures = "../../testdata/qwen2-ref"

func roundTripTensors(rng *rand.Rand) []Tensor {
	mk := func(name string, dt DType, shape ...int) Tensor {
		n := dt.Size()
		for _, d := range shape {
			n *= d
		}
		return Tensor{Header{name, dt, shape}, randBytes(rng, n)}
	}
	return []Tensor{
		mk("layers.0.w", F32, 2, 3, 4),
		mk("bias", F16, 5),
		mk("emb", BF16, 3, 8),
		mk("scalar", F32),
		mk("empty.rows", BF16, 0, 4),
		mk("empty.cols", F32, 4, 0),
		mk("a<&>\"quoted\"", F16, 1, 1, 1, 2),
		mk("z.last", BF16, 7),
	}
}

func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	tensors := roundTripTensors(rng)
	meta := map[string]string{"format": "pt", "note": "ünïcode <&>"}
	dir := t.TempDir()
	path := filepath.Join(dir, "rt.safetensors")
	if err := WriteFile(path, tensors, meta); err != nil {
		t.Fatal(err)
	}

	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n := int(raw[0]) | int(raw[1])<<8 | int(raw[2])<<16
	if n%8 != 0 {
		t.Errorf("header length %d is not a multiple of 8", n)
	}
	if !bytes.HasPrefix(raw[8:], []byte(`{"__metadata__":{"format":"pt","note":"ünïcode <&>"},"a<&>\"quoted\"":{"dtype":"F16","shape":[1,1,1,2],"data_offsets":[`)) {
		t.Errorf("unexpected header start: %.120s", raw[8:])
	}

	bothModes(t, func(t *testing.T, opts Options) {
		c := mustOpen(t, path, opts)
		var names []string
		for _, ten := range tensors {
			names = append(names, ten.Name)
		}
		sort.Strings(names)
		if !reflect.DeepEqual(c.Names(), names) {
			t.Errorf("Names = %q, want %q", c.Names(), names)
		}
		if !reflect.DeepEqual(c.Metadata(), meta) {
			t.Errorf("Metadata = %v, want %v", c.Metadata(), meta)
		}
		var total int64
		for _, ten := range tensors {
			info, ok := c.Info(ten.Name)
			if !ok {
				t.Fatalf("Info(%q) missing", ten.Name)
			}
			shape := ten.Shape
			if shape == nil {
				shape = []int{}
			}
			if info.Name != ten.Name || info.DType != ten.DType || !reflect.DeepEqual(info.Shape, shape) ||
				info.File != path || info.Size != int64(len(ten.Data)) ||
				info.Size != info.NumElements()*int64(info.DType.Size()) {
				t.Errorf("Info(%q) = %+v", ten.Name, info)
			}
			if !bytes.Equal(raw[info.Offset:info.Offset+info.Size], ten.Data) {
				t.Errorf("%q: Offset %d does not point at its data", ten.Name, info.Offset)
			}
			got, err := c.Read(ten.Name)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, ten.Data) || len(got) != len(ten.Data) {
				t.Errorf("Read(%q) differs", ten.Name)
			}
			total += int64(len(ten.Data))
		}
		if c.BytesRead() != total {
			t.Errorf("BytesRead = %d, want %d", c.BytesRead(), total)
		}
		if info, _ := c.Info("scalar"); info.NumElements() != 1 || info.Size != 4 {
			t.Errorf("scalar info %+v", info)
		}
		if info, _ := c.Info("empty.cols"); info.NumElements() != 0 || info.Size != 0 {
			t.Errorf("empty info %+v", info)
		}
		// Info returns a copy.
		info, _ := c.Info("emb")
		info.Shape[0] = 99
		if info2, _ := c.Info("emb"); info2.Shape[0] != 3 {
			t.Error("Info shares its Shape slice")
		}
		fs, err := c.ReadFloat32("emb")
		if err != nil {
			t.Fatal(err)
		}
		want, _ := DecodeFloat32(BF16, tensors[2].Data)
		if !reflect.DeepEqual(math32bits(fs), math32bits(want)) {
			t.Error("ReadFloat32 differs from DecodeFloat32")
		}
	})

	// Create with odd-sized chunks that straddle tensors gives the same file.
	var hs []Header
	var all []byte
	for _, ten := range tensors {
		hs = append(hs, ten.Header)
		all = append(all, ten.Data...)
	}
	p2 := filepath.Join(dir, "stream.safetensors")
	w, err := Create(p2, hs, meta)
	if err != nil {
		t.Fatal(err)
	}
	for rest := all; len(rest) > 0; {
		k := min(len(rest), 1+rng.Intn(13))
		if n, err := w.Write(rest[:k]); err != nil || n != k {
			t.Fatalf("Write: %d, %v", n, err)
		}
		rest = rest[k:]
	}
	if w.Remaining() != 0 {
		t.Errorf("Remaining = %d", w.Remaining())
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	raw2, _ := os.ReadFile(p2)
	if !bytes.Equal(raw, raw2) {
		t.Error("Create+Write output differs from WriteFile output")
	}

	// No metadata: no __metadata__ key.
	p3 := filepath.Join(dir, "nometa.safetensors")
	if err := WriteFile(p3, tensors[:1], nil); err != nil {
		t.Fatal(err)
	}
	raw3, _ := os.ReadFile(p3)
	if bytes.Contains(raw3, []byte(metadataKey)) {
		t.Error("__metadata__ written for nil metadata")
	}
	c := mustOpen(t, p3, Options{})
	if len(c.Metadata()) != 0 {
		t.Errorf("Metadata = %v", c.Metadata())
	}

	// No tensors at all.
	p4 := filepath.Join(dir, "none.safetensors")
	if err := WriteFile(p4, nil, map[string]string{}); err != nil {
		t.Fatal(err)
	}
	c = mustOpen(t, p4, Options{Mmap: true})
	if len(c.Names()) != 0 {
		t.Errorf("Names = %v", c.Names())
	}
}

func math32bits(f []float32) []uint32 {
	out := make([]uint32, len(f))
	for i, v := range f {
		out[i] = math.Float32bits(v)
	}
	return out
}

func TestFixtureSingleFile(t *testing.T) {
	dir := filepath.Join(fixtures, "dense-gqa-f32")
	file := filepath.Join(dir, "model.safetensors")
	bothModes(t, func(t *testing.T, opts Options) {
		for _, path := range []string{dir, file} {
			c := mustOpen(t, path, opts)
			if got := c.Files(); len(got) != 1 || filepath.Base(got[0]) != "model.safetensors" {
				t.Errorf("Open(%s) files = %v (reference.safetensors must be ignored)", path, got)
			}
			checkAllSizes(t, c)
			if c.Metadata()["format"] != "pt" {
				t.Errorf("metadata = %v", c.Metadata())
			}
			for name, shape := range map[string][]int{
				"model.embed_tokens.weight":                      {512, 64},
				"lm_head.weight":                                 {512, 64},
				"model.norm.weight":                              {64},
				"model.layers.0.self_attn.k_proj.weight":         {32, 64},
				"model.layers.2.self_attn.q_proj.bias":           {64},
				"model.layers.1.mlp.down_proj.weight":            {64, 160},
				"model.layers.1.post_attention_layernorm.weight": {64},
			} {
				info, ok := c.Info(name)
				if !ok || info.DType != F32 || !reflect.DeepEqual(info.Shape, shape) {
					t.Errorf("%s: %+v, %v; want F32 %v", name, info, ok, shape)
				}
			}
			if _, ok := c.Info("logits"); ok {
				t.Error("tensor from reference.safetensors exposed")
			}
			w, err := c.ReadFloat32("model.norm.weight")
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range w {
				if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
					t.Fatalf("non-finite norm weight %v", v)
				}
			}
		}
	})
}

// TestFixtureRewriteIdentical re-writes the single-file fixture with the
// writer and expects the very same bytes (header layout as HF writes it).
func TestFixtureRewriteIdentical(t *testing.T) {
	file := filepath.Join(fixtures, "dense-gqa-f32", "model.safetensors")
	c := mustOpen(t, file, Options{Mmap: true})
	var ts []Tensor
	for _, name := range c.Names() {
		info, _ := c.Info(name)
		b, err := c.Read(name)
		if err != nil {
			t.Fatal(err)
		}
		ts = append(ts, Tensor{Header{name, info.DType, info.Shape}, b})
	}
	sort.Slice(ts, func(i, j int) bool {
		a, _ := c.Info(ts[i].Name)
		b, _ := c.Info(ts[j].Name)
		return a.Offset < b.Offset
	})
	out := filepath.Join(t.TempDir(), "model.safetensors")
	if err := WriteFile(out, ts, c.Metadata()); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(file)
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, want) {
		t.Errorf("rewritten file differs from the fixture (%d vs %d bytes)", len(got), len(want))
	}
}

func TestFixtureSharded(t *testing.T) {
	dir := filepath.Join(fixtures, "dense-tied-bf16")
	var ix struct {
		Metadata struct {
			TotalSize int64 `json:"total_size"`
		} `json:"metadata"`
		WeightMap map[string]string `json:"weight_map"`
	}
	raw, err := os.ReadFile(filepath.Join(dir, IndexFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &ix); err != nil {
		t.Fatal(err)
	}
	bothModes(t, func(t *testing.T, opts Options) {
		for _, path := range []string{dir, filepath.Join(dir, IndexFile)} {
			c := mustOpen(t, path, opts)
			if len(c.Names()) != len(ix.WeightMap) {
				t.Errorf("%d tensors, index lists %d", len(c.Names()), len(ix.WeightMap))
			}
			if len(c.Files()) != 2 {
				t.Errorf("files = %v", c.Files())
			}
			total := checkAllSizes(t, c)
			if total != ix.Metadata.TotalSize {
				t.Errorf("sum of sizes %d, index total_size %d", total, ix.Metadata.TotalSize)
			}
			for name, file := range ix.WeightMap {
				info, _ := c.Info(name)
				if filepath.Base(info.File) != file || info.DType != BF16 {
					t.Errorf("%s: in %s as %v, index says %s", name, info.File, info.DType, file)
				}
			}
			if info, _ := c.Info("model.embed_tokens.weight"); !reflect.DeepEqual(info.Shape, []int{512, 56}) {
				t.Errorf("embed shape %v", info.Shape)
			}
			if info, _ := c.Info("model.layers.2.mlp.down_proj.weight"); !reflect.DeepEqual(info.Shape, []int{56, 144}) ||
				filepath.Base(info.File) != "model-00002-of-00002.safetensors" {
				t.Errorf("down_proj %+v", info)
			}
			if _, ok := c.Info("lm_head.weight"); ok {
				t.Error("tied checkpoint has lm_head.weight")
			}
			if c.Metadata()["format"] != "pt" {
				t.Errorf("metadata = %v", c.Metadata())
			}
			// Slices of a BF16 fixture tensor agree with the full read.
			full, err := c.Read("model.layers.0.mlp.up_proj.weight") // [144, 56]
			if err != nil {
				t.Fatal(err)
			}
			cols, err := c.ReadCols("model.layers.0.mlp.up_proj.weight", 28, 56)
			if err != nil {
				t.Fatal(err)
			}
			for r := 0; r < 144; r++ {
				if !bytes.Equal(cols[r*56:(r+1)*56], full[r*112+56:(r+1)*112]) {
					t.Fatalf("row %d of column slice differs", r)
				}
			}
		}
	})
}

// checkAllSizes reads every tensor and checks Size == elements × dtype size
// and that the data section is fully covered. It returns the sum of sizes.
func checkAllSizes(t *testing.T, c *Checkpoint) int64 {
	t.Helper()
	var total int64
	for _, name := range c.Names() {
		info, _ := c.Info(name)
		if info.Size != info.NumElements()*int64(info.DType.Size()) || info.Size == 0 {
			t.Errorf("%s: size %d, shape %v %v", name, info.Size, info.Shape, info.DType)
		}
		b, err := c.Read(name)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(b)) != info.Size {
			t.Errorf("%s: read %d bytes, want %d", name, len(b), info.Size)
		}
		total += info.Size
	}
	if c.BytesRead() < total {
		t.Errorf("BytesRead %d < %d", c.BytesRead(), total)
	}
	return total
}

// seqF32 returns n little-endian F32 values 0, 1, 2, ....
func seqF32(n int) []byte {
	f := make([]float32, n)
	for i := range f {
		f[i] = float32(i)
	}
	return EncodeFloat32(F32, f)
}

func TestSlices(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	dir := t.TempDir()
	path := filepath.Join(dir, "s.safetensors")
	err := WriteFile(path, []Tensor{
		{Header{"pad", BF16, []int{3}}, randBytes(rng, 6)}, // odd offsets for what follows
		{Header{"m", F32, []int{3, 8}}, seqF32(24)},
		{Header{"b", BF16, []int{5, 7}}, randBytes(rng, 70)},
		{Header{"v", F16, []int{9}}, randBytes(rng, 18)},
		{Header{"cube", F32, []int{2, 3, 4}}, seqF32(24)},
		{Header{"s", F32, nil}, seqF32(1)},
		{Header{"z", F32, []int{0, 5}}, nil},
		{Header{"zc", BF16, []int{4, 0}}, nil},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	bothModes(t, func(t *testing.T, opts Options) {
		c := mustOpen(t, path, opts)
		delta := func(f func() ([]byte, error)) ([]byte, int64) {
			t.Helper()
			before := c.BytesRead()
			b, err := f()
			if err != nil {
				t.Fatal(err)
			}
			return b, c.BytesRead() - before
		}

		// The examples of the spec.
		full, n := delta(func() ([]byte, error) { return c.Read("m") })
		if n != 96 || !bytes.Equal(full, seqF32(24)) {
			t.Fatalf("Read(m): %d bytes counted", n)
		}
		cols, n := delta(func() ([]byte, error) { return c.ReadCols("m", 2, 4) })
		want := EncodeFloat32(F32, []float32{2, 3, 10, 11, 18, 19})
		if n != 3*2*4 || !bytes.Equal(cols, want) {
			t.Errorf("ReadCols(m, 2, 4) = %v (%d bytes counted), want %v (24)", cols, n, want)
		}
		rows, n := delta(func() ([]byte, error) { return c.ReadRows("m", 1, 3) })
		if n != 2*8*4 || !bytes.Equal(rows, full[32:]) {
			t.Errorf("ReadRows(m, 1, 3): %d bytes counted", n)
		}
		all, n := delta(func() ([]byte, error) { return c.ReadCols("m", 0, 8) })
		if n != 96 || !bytes.Equal(all, full) {
			t.Errorf("ReadCols(m, 0, 8): %d bytes counted", n)
		}

		// Every column and row range of every tensor agrees with slicing.
		for _, name := range []string{"m", "b", "zc"} {
			info, _ := c.Info(name)
			full, _ := c.Read(name)
			R, C, es := info.Shape[0], info.Shape[1], info.DType.Size()
			for c0 := 0; c0 <= C; c0++ {
				for c1 := c0; c1 <= C; c1++ {
					got, n := delta(func() ([]byte, error) { return c.ReadCols(name, c0, c1) })
					var want []byte
					for r := 0; r < R; r++ {
						want = append(want, full[(r*C+c0)*es:(r*C+c1)*es]...)
					}
					if !bytes.Equal(got, want) || len(got) != len(want) || n != int64(len(want)) {
						t.Errorf("ReadCols(%s, %d, %d): got %d bytes (%d counted), want %d", name, c0, c1, len(got), n, len(want))
					}
				}
			}
		}
		for _, name := range []string{"m", "b", "v", "cube", "z", "zc"} {
			info, _ := c.Info(name)
			full, _ := c.Read(name)
			R := info.Shape[0]
			rb := 0
			if R > 0 {
				rb = len(full) / R
			} else {
				rb = info.DType.Size()
				for _, d := range info.Shape[1:] {
					rb *= d
				}
			}
			for r0 := 0; r0 <= R; r0++ {
				for r1 := r0; r1 <= R; r1++ {
					got, n := delta(func() ([]byte, error) { return c.ReadRows(name, r0, r1) })
					want := full[r0*rb : r1*rb]
					if !bytes.Equal(got, want) || len(got) != len(want) || n != int64(len(want)) {
						t.Errorf("ReadRows(%s, %d, %d): got %d bytes (%d counted), want %d", name, r0, r1, len(got), n, len(want))
					}
				}
			}
		}

		if opts.Mmap && mmapSupported {
			// Views alias the mapping; ReadCols copies.
			a, _ := c.Read("m")
			b, _ := c.ReadRows("m", 0, 3)
			if &a[0] != &b[0] || cap(a) != len(a) {
				t.Error("Mmap reads are not views of the mapping")
			}
			cc, _ := c.ReadCols("m", 0, 8)
			if &cc[0] == &a[0] {
				t.Error("ReadCols returned a view in Mmap mode")
			}
		} else {
			a, _ := c.Read("m")
			b, _ := c.Read("m")
			a[0] ^= 0xFF
			if a[0] == b[0] {
				t.Error("copy-mode reads share memory")
			}
		}
	})
}

func TestReadErrors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "model-00002-of-00002.safetensors")
	err := WriteFile(path, []Tensor{
		{Header{"m", F32, []int{3, 8}}, seqF32(24)},
		{Header{"cube", F32, []int{2, 3, 4}}, seqF32(24)},
		{Header{"v", F32, []int{4}}, seqF32(4)},
		{Header{"s", F32, nil}, seqF32(1)},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	bothModes(t, func(t *testing.T, opts Options) {
		c := mustOpen(t, path, opts)
		for _, tc := range []struct {
			name   string
			tensor string
			f      func() ([]byte, error)
		}{
			{"Read unknown", "nope", func() ([]byte, error) { return c.Read("nope") }},
			{"ReadRows unknown", "nope", func() ([]byte, error) { return c.ReadRows("nope", 0, 1) }},
			{"ReadCols unknown", "nope", func() ([]byte, error) { return c.ReadCols("nope", 0, 1) }},
			{"ReadRows beyond", "m", func() ([]byte, error) { return c.ReadRows("m", 0, 4) }},
			{"ReadRows negative", "m", func() ([]byte, error) { return c.ReadRows("m", -1, 2) }},
			{"ReadRows inverted", "m", func() ([]byte, error) { return c.ReadRows("m", 2, 1) }},
			{"ReadRows 1-D beyond", "v", func() ([]byte, error) { return c.ReadRows("v", 3, 5) }},
			{"ReadRows scalar", "s", func() ([]byte, error) { return c.ReadRows("s", 0, 1) }},
			{"ReadCols beyond", "m", func() ([]byte, error) { return c.ReadCols("m", 4, 9) }},
			{"ReadCols negative", "m", func() ([]byte, error) { return c.ReadCols("m", -2, 1) }},
			{"ReadCols inverted", "m", func() ([]byte, error) { return c.ReadCols("m", 5, 3) }},
			{"ReadCols 3-D", "cube", func() ([]byte, error) { return c.ReadCols("cube", 0, 1) }},
			{"ReadCols 1-D", "v", func() ([]byte, error) { return c.ReadCols("v", 0, 1) }},
			{"ReadCols scalar", "s", func() ([]byte, error) { return c.ReadCols("s", 0, 1) }},
		} {
			t.Run(tc.name, func(t *testing.T) {
				before := c.BytesRead()
				b, err := tc.f()
				if b != nil {
					t.Errorf("got %d bytes with the error", len(b))
				}
				wantErr(t, err, "model-00002-of-00002.safetensors", fmt.Sprintf("tensor %q", tc.tensor))
				if c.BytesRead() != before {
					t.Error("failed read counted bytes")
				}
			})
		}
		if _, err := c.ReadFloat32("nope"); err == nil {
			t.Error("ReadFloat32 of unknown tensor succeeded")
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		_, err := c.Read("m")
		wantErr(t, err, "closed", `"m"`)
	})
}

func TestTruncatedAfterOpen(t *testing.T) {
	bothModes(t, func(t *testing.T, opts Options) {
		path := filepath.Join(t.TempDir(), "trunc.safetensors")
		err := WriteFile(path, []Tensor{
			{Header{"first", F32, []int{4, 4}}, seqF32(16)},
			{Header{"second", F32, []int{4, 4}}, seqF32(16)},
		}, nil)
		if err != nil {
			t.Fatal(err)
		}
		c := mustOpen(t, path, opts)
		info, _ := c.Info("second")
		if err := os.Truncate(path, info.Offset+10); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read("first"); err != nil {
			t.Errorf("Read(first) after truncating second: %v", err)
		}
		_, err = c.Read("second")
		wantErr(t, err, "trunc.safetensors", `tensor "second"`)
		_, err = c.ReadRows("second", 2, 4)
		wantErr(t, err, "trunc.safetensors", `tensor "second"`)
		_, err = c.ReadCols("second", 1, 3)
		wantErr(t, err, "trunc.safetensors", `tensor "second"`)
	})
}

func TestConcurrentReads(t *testing.T) {
	rng := rand.New(rand.NewSource(3))
	path := filepath.Join(t.TempDir(), "c.safetensors")
	data := randBytes(rng, 64*32*2)
	if err := WriteFile(path, []Tensor{{Header{"w", BF16, []int{64, 32}}, data}}, nil); err != nil {
		t.Fatal(err)
	}
	bothModes(t, func(t *testing.T, opts Options) {
		c := mustOpen(t, path, opts)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var want int64
		for g := 0; g < 8; g++ {
			wg.Add(1)
			go func(seed int64) {
				defer wg.Done()
				rng := rand.New(rand.NewSource(seed))
				var mine int64
				for i := 0; i < 200; i++ {
					a, b := rng.Intn(33), rng.Intn(33)
					a, b = min(a, b), max(a, b)
					got, err := c.ReadCols("w", a, b)
					if err != nil {
						t.Error(err)
						return
					}
					for r := 0; r < 64; r++ {
						if !bytes.Equal(got[r*(b-a)*2:(r+1)*(b-a)*2], data[(r*32+a)*2:(r*32+b)*2]) {
							t.Errorf("ReadCols(%d, %d) row %d differs", a, b, r)
							return
						}
					}
					rows, err := c.ReadRows("w", a, b)
					if err != nil || !bytes.Equal(rows, data[a*64:b*64]) {
						t.Errorf("ReadRows(%d, %d): %v", a, b, err)
						return
					}
					mine += int64(len(got) + len(rows))
				}
				mu.Lock()
				want += mine
				mu.Unlock()
			}(int64(g))
		}
		wg.Wait()
		if c.BytesRead() != want {
			t.Errorf("BytesRead = %d, want %d", c.BytesRead(), want)
		}
	})
}

func TestOpenDirectory(t *testing.T) {
	rng := rand.New(rand.NewSource(4))
	t.Run("all files sorted", func(t *testing.T) {
		dir := t.TempDir()
		a := randBytes(rng, 8)
		b := randBytes(rng, 12)
		if err := WriteFile(filepath.Join(dir, "b.safetensors"), []Tensor{{Header{"x.b", F16, []int{6}}, b}}, map[string]string{"k": "b", "only_b": "1"}); err != nil {
			t.Fatal(err)
		}
		if err := WriteFile(filepath.Join(dir, "a.safetensors"), []Tensor{{Header{"x.a", F32, []int{2}}, a}}, map[string]string{"k": "a"}); err != nil {
			t.Fatal(err)
		}
		writeBytes(t, filepath.Join(dir, "notes.txt"), []byte("ignored"))
		os.Mkdir(filepath.Join(dir, "sub.safetensors"), 0o755) // a directory: ignored
		c := mustOpen(t, dir, Options{})
		if !reflect.DeepEqual(c.Names(), []string{"x.a", "x.b"}) {
			t.Errorf("Names = %v", c.Names())
		}
		if !reflect.DeepEqual(c.Metadata(), map[string]string{"k": "b", "only_b": "1"}) {
			t.Errorf("Metadata = %v", c.Metadata())
		}
		if got, _ := c.Read("x.b"); !bytes.Equal(got, b) {
			t.Error("x.b differs")
		}
	})
	t.Run("model.safetensors preferred", func(t *testing.T) {
		dir := t.TempDir()
		WriteFile(filepath.Join(dir, "model.safetensors"), []Tensor{{Header{"w", F32, []int{1}}, make([]byte, 4)}}, nil)
		WriteFile(filepath.Join(dir, "extra.safetensors"), []Tensor{{Header{"w", F32, []int{1}}, make([]byte, 4)}}, nil)
		c := mustOpen(t, dir, Options{})
		if len(c.Files()) != 1 || !reflect.DeepEqual(c.Names(), []string{"w"}) {
			t.Errorf("files %v names %v", c.Files(), c.Names())
		}
	})
	t.Run("written index", func(t *testing.T) {
		dir := t.TempDir()
		d1, d2 := randBytes(rng, 16), randBytes(rng, 6)
		WriteFile(filepath.Join(dir, "model-00001-of-00002.safetensors"), []Tensor{{Header{"a", F32, []int{2, 2}}, d1}}, map[string]string{"format": "pt"})
		WriteFile(filepath.Join(dir, "model-00002-of-00002.safetensors"), []Tensor{{Header{"b", BF16, []int{3}}, d2}}, map[string]string{"format": "pt"})
		wm := map[string]string{"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
		if err := WriteIndex(dir, wm, 22); err != nil {
			t.Fatal(err)
		}
		raw, _ := os.ReadFile(filepath.Join(dir, IndexFile))
		want := "{\n  \"metadata\": {\n    \"total_size\": 22\n  },\n  \"weight_map\": {\n    \"a\": \"model-00001-of-00002.safetensors\",\n    \"b\": \"model-00002-of-00002.safetensors\"\n  }\n}\n"
		if string(raw) != want {
			t.Errorf("index:\n%s\nwant:\n%s", raw, want)
		}
		bothModes(t, func(t *testing.T, opts Options) {
			c := mustOpen(t, dir, opts)
			ga, _ := c.Read("a")
			gb, _ := c.Read("b")
			if !bytes.Equal(ga, d1) || !bytes.Equal(gb, d2) || !reflect.DeepEqual(c.Names(), []string{"a", "b"}) {
				t.Error("sharded round trip differs")
			}
		})
	})
}
