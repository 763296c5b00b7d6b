package safetensors

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"unicode/utf8"
)

// writeBufferSize is the buffer of a Writer; memory use is bounded by it
// whatever the size of the checkpoint.
const writeBufferSize = 1 << 20

// Header declares one tensor to be written by Create.
type Header struct {
	Name  string
	DType DType
	Shape []int
}

// Tensor is a tensor with its data, for WriteFile.
type Tensor struct {
	Header
	Data []byte
}

// Writer streams the data section of a safetensors file created by Create.
// It is not safe for concurrent use.
type Writer struct {
	path    string
	f       *os.File
	bw      *bufio.Writer
	headers []Header
	sizes   []int64
	total   int64 // bytes of data declared
	written int64 // bytes of data accepted so far
	err     error // sticky: first Write error
	closed  bool
	closeEr error
}

// Create creates (or truncates) path and writes the header for tensors: data
// offsets are laid out contiguously in the given order; the JSON has
// "__metadata__" first (when metadata is non-nil) and the tensors sorted by
// name, as HF writes it, padded with spaces to a multiple of 8 bytes. The
// returned Writer accepts the data bytes sequentially, in the given order.
func Create(path string, tensors []Header, metadata map[string]string) (*Writer, error) {
	hdr, sizes, total, err := buildHeader(path, tensors, metadata)
	if err != nil {
		return nil, err
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fwrapf(err, path, "cannot create")
	}
	w := &Writer{path: path, f: f, bw: bufio.NewWriterSize(f, writeBufferSize),
		headers: append([]Header(nil), tensors...), sizes: sizes, total: total}
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], uint64(len(hdr)))
	w.bw.Write(n[:])
	if _, err := w.bw.Write(hdr); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fwrapf(err, path, "cannot write header")
	}
	return w, nil
}

// buildHeader validates tensors and metadata and returns the padded header
// JSON, the byte size of each tensor and the total data size.
func buildHeader(path string, tensors []Header, metadata map[string]string) ([]byte, []int64, int64, error) {
	type item struct {
		name       string
		dt         DType
		shape      []int
		begin, end int64
	}
	items := make([]item, len(tensors))
	sizes := make([]int64, len(tensors))
	seen := make(map[string]bool, len(tensors))
	var off int64
	for i, h := range tensors {
		if h.Name == metadataKey {
			return nil, nil, 0, errf(path, h.Name, "name is reserved")
		}
		if !utf8.ValidString(h.Name) {
			return nil, nil, 0, errf(path, h.Name, "name is not valid UTF-8")
		}
		if seen[h.Name] {
			return nil, nil, 0, errf(path, h.Name, "declared twice")
		}
		seen[h.Name] = true
		if !h.DType.Valid() {
			return nil, nil, 0, errf(path, h.Name, "invalid dtype %v", h.DType)
		}
		size := int64(h.DType.Size())
		for _, d := range h.Shape {
			if d < 0 {
				return nil, nil, 0, errf(path, h.Name, "negative dimension in shape %s", fmtDims(h.Shape))
			}
		}
		if hasZero(h.Shape) {
			size = 0
		} else {
			for _, d := range h.Shape {
				if int64(d) > math.MaxInt64/size {
					return nil, nil, 0, errf(path, h.Name, "byte size of shape %s overflows", fmtDims(h.Shape))
				}
				size *= int64(d)
			}
		}
		if off > math.MaxInt64-size {
			return nil, nil, 0, errf(path, h.Name, "total data size overflows")
		}
		sizes[i] = size
		items[i] = item{h.Name, h.DType, h.Shape, off, off + size}
		off += size
	}
	sort.Slice(items, func(i, j int) bool { return items[i].name < items[j].name })

	var b bytes.Buffer
	b.WriteByte('{')
	first := true
	if metadata != nil {
		keys := make([]string, 0, len(metadata))
		for k, v := range metadata {
			if !utf8.ValidString(k) || !utf8.ValidString(v) {
				return nil, nil, 0, ferrf(path, "metadata %q is not valid UTF-8", k)
			}
			keys = append(keys, k)
		}
		sort.Strings(keys)
		b.WriteString(`"__metadata__":{`)
		for i, k := range keys {
			if i > 0 {
				b.WriteByte(',')
			}
			writeJSONString(&b, k)
			b.WriteByte(':')
			writeJSONString(&b, metadata[k])
		}
		b.WriteByte('}')
		first = false
	}
	for _, it := range items {
		if !first {
			b.WriteByte(',')
		}
		first = false
		writeJSONString(&b, it.name)
		b.WriteString(`:{"dtype":"`)
		b.WriteString(it.dt.String())
		b.WriteString(`","shape":[`)
		for i, d := range it.shape {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(strconv.Itoa(d))
		}
		fmt.Fprintf(&b, `],"data_offsets":[%d,%d]}`, it.begin, it.end)
	}
	b.WriteByte('}')
	for b.Len()%8 != 0 {
		b.WriteByte(' ')
	}
	if b.Len() > MaxHeaderSize {
		return nil, nil, 0, ferrf(path, "header of %d bytes exceeds the %d byte limit", b.Len(), MaxHeaderSize)
	}
	return b.Bytes(), sizes, off, nil
}

func hasZero(shape []int) bool {
	for _, d := range shape {
		if d == 0 {
			return true
		}
	}
	return false
}

// writeJSONString writes s as a JSON string without HTML escaping.
func writeJSONString(b *bytes.Buffer, s string) {
	enc := json.NewEncoder(b)
	enc.SetEscapeHTML(false)
	enc.Encode(s)           // cannot fail for a string
	b.Truncate(b.Len() - 1) // drop Encode's newline
}

// Write appends data bytes. Writing more bytes than declared is an error
// (and nothing of p is written); errors are sticky.
func (w *Writer) Write(p []byte) (int, error) {
	if w.closed {
		return 0, ferrf(w.path, "write after Close")
	}
	if w.err != nil {
		return 0, w.err
	}
	if int64(len(p)) > w.total-w.written {
		w.err = ferrf(w.path, "write of %d bytes exceeds the declared data size: %d of %d bytes already written",
			len(p), w.written, w.total)
		return 0, w.err
	}
	n, err := w.bw.Write(p)
	w.written += int64(n)
	if err != nil {
		w.err = fwrapf(err, w.path, "write")
		return n, w.err
	}
	return n, nil
}

// Remaining returns the number of data bytes still to be written.
func (w *Writer) Remaining() int64 { return w.total - w.written }

// current returns the name of the tensor the next byte belongs to.
func (w *Writer) current() string {
	off := w.written
	for i, s := range w.sizes {
		if off < s {
			return w.headers[i].Name
		}
		off -= s
	}
	return ""
}

// Close flushes and closes the file. It is an error if fewer bytes were
// written than declared, or if a Write failed; the incomplete file is then
// removed. Close is idempotent (later calls return the first result).
func (w *Writer) Close() error {
	if w.closed {
		return w.closeEr
	}
	w.closed = true
	err := w.err
	if err == nil && w.written < w.total {
		err = errf(w.path, w.current(), "only %d of %d declared data bytes written", w.written, w.total)
	}
	if ferr := w.bw.Flush(); ferr != nil && err == nil {
		err = fwrapf(ferr, w.path, "write")
	}
	if cerr := w.f.Close(); cerr != nil && err == nil {
		err = fwrapf(cerr, w.path, "close")
	}
	if err != nil {
		os.Remove(w.path)
	}
	w.closeEr = err
	return err
}

// WriteFile writes a small safetensors file holding tensors (laid out in
// the given order) and metadata (omitted when nil).
func WriteFile(path string, tensors []Tensor, metadata map[string]string) error {
	hs := make([]Header, len(tensors))
	for i, t := range tensors {
		hs[i] = t.Header
	}
	w, err := Create(path, hs, metadata)
	if err != nil {
		return err
	}
	for i, t := range tensors {
		if int64(len(t.Data)) != w.sizes[i] {
			w.err = errf(path, t.Name, "has %d data bytes, shape %s × %v needs %d", len(t.Data), fmtDims(t.Shape), t.DType, w.sizes[i])
			break
		}
		if _, err := w.Write(t.Data); err != nil {
			break
		}
	}
	return w.Close()
}

type indexOut struct {
	Metadata  indexMeta         `json:"metadata"`
	WeightMap map[string]string `json:"weight_map"`
}

type indexMeta struct {
	TotalSize int64 `json:"total_size"`
}

// WriteIndex writes model.safetensors.index.json in dir, mapping tensor
// names to shard file names (base names in dir), in HF's layout
// (2-space indent, sorted keys).
func WriteIndex(dir string, weightMap map[string]string, totalSize int64) error {
	path := filepath.Join(dir, IndexFile)
	if len(weightMap) == 0 {
		return ferrf(path, "empty weight_map")
	}
	if totalSize < 0 {
		return ferrf(path, "negative total_size %d", totalSize)
	}
	for name, file := range weightMap {
		if err := checkShardName(file); err != nil {
			return wrapf(err, path, name, "bad shard name %q", file)
		}
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(indexOut{indexMeta{totalSize}, weightMap}); err != nil {
		return fwrapf(err, path, "encode")
	}
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		return fwrapf(err, path, "write")
	}
	return nil
}
