package safetensors

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"
)

// MaxHeaderSize is the largest header (JSON) accepted, as in the reference
// implementation.
const MaxHeaderSize = 100_000_000

// maxDims bounds the rank of a tensor so that a hostile header cannot make
// the parser allocate a huge shape slice.
const maxDims = 64

// metadataKey is the reserved header key holding string→string metadata.
const metadataKey = "__metadata__"

// Error is the error type returned for malformed files, bad arguments and
// failed reads. File is the path of the file involved (as given to Open, or
// the directory joined with a shard name); Tensor names the tensor involved,
// if any.
type Error struct {
	File   string
	Tensor string
	Msg    string
	Err    error // underlying error, if any

	hasTensor bool // Tensor is meaningful (the empty string is a legal name)
}

func (e *Error) Error() string {
	s := "safetensors: " + e.File + ": "
	if e.hasTensor || e.Tensor != "" {
		s += "tensor " + strconv.Quote(e.Tensor) + ": "
	}
	s += e.Msg
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// errf returns an error about tensor in file.
func errf(file, tensor string, format string, args ...any) *Error {
	return wrapf(nil, file, tensor, format, args...)
}

// wrapf returns an error about tensor in file, wrapping err.
func wrapf(err error, file, tensor string, format string, args ...any) *Error {
	return &Error{File: file, Tensor: tensor, hasTensor: true, Msg: fmt.Sprintf(format, args...), Err: err}
}

// ferrf returns an error about file that involves no tensor.
func ferrf(file string, format string, args ...any) *Error {
	return fwrapf(nil, file, format, args...)
}

// fwrapf returns an error about file that involves no tensor, wrapping err.
func fwrapf(err error, file string, format string, args ...any) *Error {
	return &Error{File: file, Msg: fmt.Sprintf(format, args...), Err: err}
}

// TensorInfo describes one tensor of a checkpoint.
type TensorInfo struct {
	Name   string
	DType  DType
	Shape  []int
	File   string // path of the file that holds it
	Offset int64  // absolute offset of its first data byte in File (8 + N + begin)
	Size   int64  // bytes
}

// NumElements returns the product of the dimensions (1 for a scalar).
func (t TensorInfo) NumElements() int64 {
	n := int64(1)
	for _, d := range t.Shape {
		n *= int64(d)
	}
	return n
}

// rowsAndRowBytes returns the first dimension and the byte size of one row
// (product of the remaining dims times the element size). For a 1-D tensor
// each element is a row. ok is false for scalars.
func (t TensorInfo) rowsAndRowBytes() (rows int64, rowBytes int64, ok bool) {
	if len(t.Shape) == 0 {
		return 0, 0, false
	}
	rowBytes = int64(t.DType.Size())
	for _, d := range t.Shape[1:] {
		rowBytes *= int64(d)
	}
	return int64(t.Shape[0]), rowBytes, true
}

func (t TensorInfo) clone() TensorInfo {
	t.Shape = append([]int{}, t.Shape...)
	return t
}

// ParseHeader parses and validates a header (the N JSON bytes that follow
// the 8-byte length), given the length of the data section that follows it.
// file is used in error messages and as TensorInfo.File. It returns tensors
// by name (with absolute offsets 8+N+begin) and the __metadata__ map (nil
// when absent).
//
// Accepted headers satisfy: every tensor has a supported dtype, a shape
// with non-negative dims whose element count (ignoring zero dims) fits in an
// int64, 0 <= begin <= end <= dataLen, end-begin == elements × dtype size,
// and no two non-empty byte ranges overlap. The header must be valid UTF-8
// with no duplicate top-level keys, and shapes have at most 64 dims. Gaps
// between tensors are allowed. Unknown keys in a tensor entry are ignored.
func ParseHeader(file string, header []byte, dataLen int64) (map[string]TensorInfo, map[string]string, error) {
	if len(header) > MaxHeaderSize {
		return nil, nil, ferrf(file, "header of %d bytes exceeds the %d byte limit", len(header), MaxHeaderSize)
	}
	if dataLen < 0 {
		return nil, nil, ferrf(file, "negative data section length %d", dataLen)
	}
	if !utf8.Valid(header) {
		return nil, nil, ferrf(file, "header is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(header))
	tok, err := dec.Token()
	if err != nil {
		return nil, nil, fwrapf(err, file, "header is not valid JSON")
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, nil, ferrf(file, "header is not a JSON object")
	}
	entries := make(map[string]json.RawMessage)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, fwrapf(err, file, "header is not valid JSON")
		}
		key, ok := tok.(string)
		if !ok { // cannot happen for valid JSON, but be defensive
			return nil, nil, ferrf(file, "header is not valid JSON: unexpected %v", tok)
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, nil, fwrapf(err, file, "header is not valid JSON")
		}
		if _, dup := entries[key]; dup {
			return nil, nil, ferrf(file, "duplicate key %q in header", key)
		}
		entries[key] = raw
	}
	if _, err := dec.Token(); err != nil { // closing '}'
		return nil, nil, fwrapf(err, file, "header is not valid JSON")
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, nil, ferrf(file, "header is not valid JSON: trailing data after the object")
	}

	var meta map[string]string
	if raw, ok := entries[metadataKey]; ok {
		delete(entries, metadataKey)
		meta, err = parseMetadata(raw)
		if err != nil {
			return nil, nil, fwrapf(err, file, "%s is not an object of strings", metadataKey)
		}
	}

	names := make([]string, 0, len(entries))
	for name := range entries {
		names = append(names, name)
	}
	sort.Strings(names)

	base := int64(8 + len(header))
	tensors := make(map[string]TensorInfo, len(names))
	type span struct {
		name       string
		begin, end int64
	}
	spans := make([]span, 0, len(names))
	for _, name := range names {
		ti, begin, end, err := parseEntry(file, name, entries[name], dataLen)
		if err != nil {
			return nil, nil, err
		}
		ti.Offset = base + begin
		tensors[name] = ti
		if end > begin {
			spans = append(spans, span{name, begin, end})
		}
	}
	sort.Slice(spans, func(i, j int) bool {
		if spans[i].begin != spans[j].begin {
			return spans[i].begin < spans[j].begin
		}
		return spans[i].name < spans[j].name
	})
	for i := 1; i < len(spans); i++ {
		p, s := spans[i-1], spans[i]
		if s.begin < p.end {
			return nil, nil, errf(file, s.name, "data_offsets [%d, %d] overlap tensor %q [%d, %d]",
				s.begin, s.end, p.name, p.begin, p.end)
		}
	}
	return tensors, meta, nil
}

func isNull(raw json.RawMessage) bool {
	return string(bytes.TrimSpace(raw)) == "null"
}

func parseMetadata(raw json.RawMessage) (map[string]string, error) {
	if isNull(raw) {
		return nil, fmt.Errorf("got null")
	}
	var m map[string]string
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, err
	}
	return m, nil
}

// parseEntry validates one tensor entry and returns its info (Offset unset)
// and its relative data offsets.
func parseEntry(file, name string, raw json.RawMessage, dataLen int64) (TensorInfo, int64, int64, error) {
	fail := func(format string, args ...any) (TensorInfo, int64, int64, error) {
		return TensorInfo{}, 0, 0, errf(file, name, format, args...)
	}
	var fields map[string]json.RawMessage
	if isNull(raw) || json.Unmarshal(raw, &fields) != nil {
		return fail("entry is not a JSON object")
	}
	for _, k := range []string{"dtype", "shape", "data_offsets"} {
		if _, ok := fields[k]; !ok {
			return fail("missing %q", k)
		}
	}

	var dts string
	if isNull(fields["dtype"]) || json.Unmarshal(fields["dtype"], &dts) != nil {
		return fail(`"dtype" is not a string`)
	}
	dt, err := ParseDType(dts)
	if err != nil {
		return fail("unsupported dtype %q", dts)
	}

	dims, err := parseIntArray(fields["shape"], maxDims)
	if err != nil {
		return fail(`"shape" is not an array of integers: %v`, err)
	}
	shape := make([]int, len(dims))
	nz := int64(1) // product of non-zero dims; must not overflow
	elems := int64(1)
	for i, d := range dims {
		if d < 0 {
			return fail("negative dimension %d in shape %s", d, fmtDims(dims))
		}
		if d > math.MaxInt {
			return fail("dimension %d in shape %s overflows int", d, fmtDims(dims))
		}
		shape[i] = int(d)
		if d == 0 {
			elems = 0
			continue
		}
		if nz > math.MaxInt64/d {
			return fail("element count of shape %s overflows", fmtDims(dims))
		}
		nz *= d
	}
	if elems != 0 {
		elems = nz
	}
	esz := int64(dt.Size())
	if nz > math.MaxInt64/esz {
		return fail("byte size of shape %s × %v overflows", fmtDims(dims), dt)
	}

	offs, err := parseIntArray(fields["data_offsets"], 2)
	if err != nil || len(offs) != 2 {
		return fail(`"data_offsets" is not an array of two integers`)
	}
	begin, end := offs[0], offs[1]
	if begin < 0 || end < 0 {
		return fail("data_offsets [%d, %d] negative", begin, end)
	}
	if begin > end {
		return fail("data_offsets [%d, %d] inverted", begin, end)
	}
	if end > dataLen {
		return fail("data_offsets [%d, %d] beyond the data section of %d bytes", begin, end, dataLen)
	}
	if want := elems * esz; end-begin != want {
		return fail("shape %s × %v needs %d bytes but data_offsets [%d, %d] span %d", fmtDims(dims), dt, want, begin, end, end-begin)
	}
	return TensorInfo{Name: name, DType: dt, Shape: shape, File: file, Size: end - begin}, begin, end, nil
}

// parseIntArray parses a JSON array of integers (int64 range, no fraction
// or exponent) of at most max elements, without allocating more than that.
// raw is a single valid JSON value (as produced by the decoder).
func parseIntArray(raw json.RawMessage, max int) ([]int64, error) {
	i := 0
	skip := func() {
		for i < len(raw) && (raw[i] == ' ' || raw[i] == '\t' || raw[i] == '\n' || raw[i] == '\r') {
			i++
		}
	}
	skip()
	if i >= len(raw) || raw[i] != '[' {
		return nil, fmt.Errorf("not an array")
	}
	i++
	out := []int64{}
	for {
		skip()
		if i < len(raw) && raw[i] == ']' && len(out) == 0 {
			i++
			break
		}
		if len(out) >= max {
			return nil, fmt.Errorf("more than %d elements", max)
		}
		start := i
		for i < len(raw) && strings.IndexByte("+-0123456789.eE", raw[i]) >= 0 {
			i++
		}
		if start == i {
			return nil, fmt.Errorf("element %d is not a number", len(out))
		}
		num := string(raw[start:i])
		v, err := strconv.ParseInt(num, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("element %d (%s) is not an int64", len(out), num)
		}
		out = append(out, v)
		skip()
		if i < len(raw) && raw[i] == ',' {
			i++
			continue
		}
		if i < len(raw) && raw[i] == ']' {
			i++
			break
		}
		return nil, fmt.Errorf("malformed array")
	}
	skip()
	if i != len(raw) {
		return nil, fmt.Errorf("malformed array")
	}
	return out, nil
}

// fmtDims formats a shape like the JSON it came from: [2, 3].
func fmtDims[T int | int64](dims []T) string {
	b := []byte{'['}
	for i, d := range dims {
		if i > 0 {
			b = append(b, ", "...)
		}
		b = strconv.AppendInt(b, int64(d), 10)
	}
	return string(append(b, ']'))
}
