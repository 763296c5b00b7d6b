package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
)

// IndexFile is the name of the shard index of a sharded checkpoint.
const IndexFile = "model.safetensors.index.json"

// SingleFile is the name of an unsharded checkpoint inside a model directory.
const SingleFile = "model.safetensors"

// maxIndexSize bounds the size of an index file read by Open.
const maxIndexSize = 64 << 20

// Options configures Open.
type Options struct {
	// Mmap maps the files read-only; Read and ReadRows then return views
	// into the mapping (valid until Close, must not be modified) instead
	// of copies. ReadCols always copies. On platforms without mmap (non-unix)
	// the option is ignored and reads copy.
	Mmap bool
}

// shard is one open safetensors file.
type shard struct {
	path string
	f    *os.File
	data []byte // the whole file, when mapped
}

type entry struct {
	info  TensorInfo
	shard *shard
}

// Checkpoint is one safetensors file or a directory of shards, open for
// reading. Its methods are safe for concurrent use; Close waits for reads in
// progress.
type Checkpoint struct {
	path    string
	mmap    bool
	shards  []*shard
	tensors map[string]entry
	names   []string
	meta    map[string]string

	bytesRead atomic.Int64

	mu     sync.RWMutex // held shared by reads, exclusively by Close
	closed bool
}

// Open opens a path that is either a single safetensors file or a model
// directory. For a directory: if model.safetensors.index.json exists it is
// used (every shard it names must exist and hold the tensors it assigns to
// it; only the tensors of the weight_map are exposed); else if
// model.safetensors exists, that file alone is used (other *.safetensors
// files, e.g. reference outputs, are ignored); else every *.safetensors
// file in the directory is used, in name order, and a tensor name present
// in two files is an error. A path naming an index file directly is treated
// like its directory with that index.
//
// Only headers are read at Open (one small ReadAt each).
func Open(path string, opts Options) (*Checkpoint, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fwrapf(err, path, "cannot open")
	}
	c := &Checkpoint{path: path, mmap: opts.Mmap && mmapSupported, tensors: make(map[string]entry), meta: make(map[string]string)}
	ok := false
	defer func() {
		if !ok {
			c.Close()
		}
	}()
	switch {
	case !st.IsDir() && strings.HasSuffix(path, ".index.json"):
		err = c.openIndex(path)
	case !st.IsDir():
		err = c.openFiles([]string{path})
	default:
		idx := filepath.Join(path, IndexFile)
		single := filepath.Join(path, SingleFile)
		if exists, e := regularFileExists(idx); e != nil {
			err = fwrapf(e, idx, "cannot stat")
		} else if exists {
			err = c.openIndex(idx)
		} else if exists, e := regularFileExists(single); e != nil {
			err = fwrapf(e, single, "cannot stat")
		} else if exists {
			err = c.openFiles([]string{single})
		} else {
			err = c.openDir(path)
		}
	}
	if err != nil {
		return nil, err
	}
	c.names = make([]string, 0, len(c.tensors))
	for name := range c.tensors {
		c.names = append(c.names, name)
	}
	sort.Strings(c.names)
	ok = true
	return c, nil
}

func regularFileExists(path string) (bool, error) {
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return !st.IsDir(), nil
}

// openDir opens every *.safetensors file of dir, in name order.
func (c *Checkpoint) openDir(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fwrapf(err, dir, "cannot read directory")
	}
	var files []string
	for _, e := range ents {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".safetensors") {
			continue
		}
		files = append(files, filepath.Join(dir, e.Name()))
	}
	if len(files) == 0 {
		return ferrf(dir, "no %s, %s or *.safetensors file in directory", IndexFile, SingleFile)
	}
	sort.Strings(files)
	return c.openFiles(files)
}

// openFiles opens files and exposes all their tensors; a name present in
// two files is an error.
func (c *Checkpoint) openFiles(files []string) error {
	for _, p := range files {
		sh, tensors, meta, err := c.openShard(p)
		if err != nil {
			return err
		}
		for name, ti := range tensors {
			if prev, dup := c.tensors[name]; dup {
				return errf(p, name, "also present in %s", prev.shard.path)
			}
			c.tensors[name] = entry{ti, sh}
		}
		for k, v := range meta {
			c.meta[k] = v
		}
	}
	return nil
}

type indexJSON struct {
	Metadata  map[string]any    `json:"metadata"`
	WeightMap map[string]string `json:"weight_map"`
}

// openIndex opens the shards named by an index file.
func (c *Checkpoint) openIndex(idx string) error {
	f, err := os.Open(idx)
	if err != nil {
		return fwrapf(err, idx, "cannot open index")
	}
	raw, err := io.ReadAll(io.LimitReader(f, maxIndexSize+1))
	f.Close()
	if err != nil {
		return fwrapf(err, idx, "cannot read index")
	}
	if len(raw) > maxIndexSize {
		return ferrf(idx, "index larger than %d bytes", maxIndexSize)
	}
	var ix indexJSON
	if err := json.Unmarshal(raw, &ix); err != nil {
		return fwrapf(err, idx, "malformed index")
	}
	if len(ix.WeightMap) == 0 {
		return ferrf(idx, "index has no weight_map or it is empty")
	}
	dir := filepath.Dir(idx)
	mapped := make([]string, 0, len(ix.WeightMap))
	for name := range ix.WeightMap {
		mapped = append(mapped, name)
	}
	sort.Strings(mapped) // deterministic errors
	byShard := make(map[string][]string)
	for _, name := range mapped {
		file := ix.WeightMap[name]
		if err := checkShardName(file); err != nil {
			return wrapf(err, idx, name, "bad shard name %q in weight_map", file)
		}
		byShard[file] = append(byShard[file], name)
	}
	files := make([]string, 0, len(byShard))
	for file := range byShard {
		files = append(files, file)
	}
	sort.Strings(files)
	for _, file := range files {
		p := filepath.Join(dir, file)
		if _, err := os.Stat(p); err != nil {
			return fwrapf(err, idx, "missing shard %q", file)
		}
	}
	for _, file := range files {
		p := filepath.Join(dir, file)
		sh, tensors, meta, err := c.openShard(p)
		if err != nil {
			return err
		}
		for _, name := range byShard[file] {
			ti, ok := tensors[name]
			if !ok {
				return errf(p, name, "listed in %s but not present in the shard", filepath.Base(idx))
			}
			c.tensors[name] = entry{ti, sh}
		}
		for k, v := range meta {
			c.meta[k] = v
		}
	}
	return nil
}

// checkShardName rejects weight_map file names that could escape the
// checkpoint directory.
func checkShardName(name string) error {
	switch {
	case name == "" || name == ".":
		return errors.New("empty name")
	case strings.ContainsAny(name, `/\`) || strings.ContainsRune(name, filepath.Separator):
		return errors.New("contains a path separator")
	case strings.Contains(name, ".."):
		return errors.New(`contains ".."`)
	case strings.ContainsRune(name, 0):
		return errors.New("contains a NUL byte")
	}
	return nil
}

// openShard opens one file, reads and validates its header, maps it when
// requested, and registers it with c (so Close releases it).
func (c *Checkpoint) openShard(path string) (*shard, map[string]TensorInfo, map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, nil, fwrapf(err, path, "cannot open")
	}
	sh := &shard{path: path, f: f}
	c.shards = append(c.shards, sh)
	st, err := f.Stat()
	if err != nil {
		return nil, nil, nil, fwrapf(err, path, "cannot stat")
	}
	if !st.Mode().IsRegular() {
		return nil, nil, nil, ferrf(path, "not a regular file")
	}
	size := st.Size()
	if size < 8 {
		return nil, nil, nil, ferrf(path, "file of %d bytes is shorter than the 8-byte header length", size)
	}
	var lenBuf [8]byte
	if _, err := f.ReadAt(lenBuf[:], 0); err != nil {
		return nil, nil, nil, fwrapf(err, path, "cannot read header length")
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > MaxHeaderSize {
		return nil, nil, nil, ferrf(path, "header length %d exceeds the %d byte limit", n, MaxHeaderSize)
	}
	if n > uint64(size-8) {
		return nil, nil, nil, ferrf(path, "header length %d exceeds the %d bytes after the length field", n, size-8)
	}
	header := make([]byte, n)
	if _, err := f.ReadAt(header, 8); err != nil {
		return nil, nil, nil, fwrapf(err, path, "cannot read header")
	}
	tensors, meta, err := ParseHeader(path, header, size-8-int64(n))
	if err != nil {
		return nil, nil, nil, err
	}
	if c.mmap {
		if size > math.MaxInt {
			return nil, nil, nil, ferrf(path, "file of %d bytes is too large to map", size)
		}
		data, err := mmapFile(f, int(size))
		if err != nil {
			return nil, nil, nil, fwrapf(err, path, "cannot mmap")
		}
		sh.data = data
	}
	return sh, tensors, meta, nil
}

// Path returns the path given to Open.
func (c *Checkpoint) Path() string { return c.path }

// Files returns the paths of the files opened, in the order they were
// opened (sorted by name).
func (c *Checkpoint) Files() []string {
	out := make([]string, len(c.shards))
	for i, sh := range c.shards {
		out[i] = sh.path
	}
	return out
}

// Names returns the tensor names, sorted.
func (c *Checkpoint) Names() []string { return append([]string(nil), c.names...) }

// Info returns the description of a tensor.
func (c *Checkpoint) Info(name string) (TensorInfo, bool) {
	e, ok := c.tensors[name]
	if !ok {
		return TensorInfo{}, false
	}
	return e.info.clone(), true
}

// Metadata returns the __metadata__ of all files merged (a later file, in
// name order, wins on conflicting keys). The map is a copy.
func (c *Checkpoint) Metadata() map[string]string {
	out := make(map[string]string, len(c.meta))
	for k, v := range c.meta {
		out[k] = v
	}
	return out
}

// BytesRead returns the number of bytes of tensor data read through c so
// far: bytes read from the files, or in Mmap mode the bytes of the views
// returned and the bytes copied by ReadCols.
func (c *Checkpoint) BytesRead() int64 { return c.bytesRead.Load() }

// Close releases the files (and mappings). Slices returned in Mmap mode
// become invalid. Close is idempotent.
func (c *Checkpoint) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	var first error
	for _, sh := range c.shards {
		if sh.data != nil {
			if err := munmap(sh.data); err != nil && first == nil {
				first = fwrapf(err, sh.path, "munmap")
			}
			sh.data = nil
		}
		if err := sh.f.Close(); err != nil && first == nil {
			first = fwrapf(err, sh.path, "close")
		}
	}
	return first
}

// lookup finds a tensor for a read; the caller must hold c.mu shared.
func (c *Checkpoint) lookup(name string) (entry, error) {
	if c.closed {
		return entry{}, errf(c.path, name, "checkpoint is closed")
	}
	e, ok := c.tensors[name]
	if !ok {
		return entry{}, errf(c.path, name, "no such tensor")
	}
	return e, nil
}

// Read returns the bytes of a whole tensor: a fresh slice, or in Mmap mode
// a read-only view into the mapping.
func (c *Checkpoint) Read(name string) ([]byte, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, err := c.lookup(name)
	if err != nil {
		return nil, err
	}
	return c.readSpan(e, 0, e.info.Size)
}

// ReadFloat32 reads a whole tensor and widens it to float32.
func (c *Checkpoint) ReadFloat32(name string) ([]float32, error) {
	b, err := c.Read(name)
	if err != nil {
		return nil, err
	}
	return DecodeFloat32(c.tensors[name].info.DType, b)
}

// ReadRows returns rows [r0, r1) of a tensor whose first dimension is rows
// (for a 1-D tensor each element is a row; for N-D a row is the product of
// the remaining dims). It is one contiguous read (a view in Mmap mode).
func (c *Checkpoint) ReadRows(name string, r0, r1 int) ([]byte, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, err := c.lookup(name)
	if err != nil {
		return nil, err
	}
	rows, rowBytes, ok := e.info.rowsAndRowBytes()
	if !ok {
		return nil, errf(e.shard.path, name, "ReadRows on a 0-D tensor")
	}
	if err := checkRange(e, "row", r0, r1, rows); err != nil {
		return nil, err
	}
	return c.readSpan(e, int64(r0)*rowBytes, int64(r1-r0)*rowBytes)
}

// ReadCols returns columns [c0, c1) of a 2-D tensor as a packed
// [rows, c1-c0] row-major slice (always a fresh copy). It reads only those
// bytes: one read when the range covers whole rows, else one ReadAt per
// row straight into the result.
func (c *Checkpoint) ReadCols(name string, c0, c1 int) ([]byte, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, err := c.lookup(name)
	if err != nil {
		return nil, err
	}
	ti := e.info
	if len(ti.Shape) != 2 {
		return nil, errf(e.shard.path, name, "ReadCols on a %d-D tensor (shape %s); need 2-D", len(ti.Shape), fmtDims(ti.Shape))
	}
	rows, cols := int64(ti.Shape[0]), int64(ti.Shape[1])
	if err := checkRange(e, "column", c0, c1, cols); err != nil {
		return nil, err
	}
	es := int64(ti.DType.Size())
	rowBytes := cols * es
	w := int64(c1-c0) * es
	if (c0 == 0 && int64(c1) == cols) || rows <= 1 {
		b, err := c.readSpan(e, int64(c0)*es, rows*w)
		if err != nil || !c.mmap {
			return b, err
		}
		return append([]byte(nil), b...), nil
	}
	total := rows * w
	if total > math.MaxInt {
		return nil, errf(e.shard.path, name, "%d bytes do not fit in memory", total)
	}
	out := make([]byte, total)
	if total == 0 {
		return out, nil
	}
	if c.mmap {
		if err := c.checkMapped(e); err != nil {
			return nil, err
		}
		base := ti.Offset + int64(c0)*es
		for r := int64(0); r < rows; r++ {
			src := base + r*rowBytes
			copy(out[r*w:(r+1)*w], e.shard.data[src:src+w])
		}
		c.bytesRead.Add(total)
		return out, nil
	}
	for r := int64(0); r < rows; r++ {
		off := ti.Offset + r*rowBytes + int64(c0)*es
		n, err := e.shard.f.ReadAt(out[r*w:(r+1)*w], off)
		c.bytesRead.Add(int64(n))
		if err != nil {
			return nil, c.readErr(e, err, off, w, n)
		}
	}
	return out, nil
}

// checkRange validates a half-open range [a, b) of n rows or columns.
func checkRange(e entry, what string, a, b int, n int64) error {
	switch {
	case b < a:
		return errf(e.shard.path, e.info.Name, "%s range [%d, %d) inverted", what, a, b)
	case a < 0 || int64(b) > n:
		return errf(e.shard.path, e.info.Name, "%s range [%d, %d) out of range for %d %ss", what, a, b, n, what)
	}
	return nil
}

// readSpan reads size bytes at offset rel within the tensor's data. The
// caller holds c.mu shared and has validated the range.
func (c *Checkpoint) readSpan(e entry, rel, size int64) ([]byte, error) {
	if size > math.MaxInt {
		return nil, errf(e.shard.path, e.info.Name, "%d bytes do not fit in memory", size)
	}
	off := e.info.Offset + rel
	if c.mmap {
		if err := c.checkMapped(e); err != nil {
			return nil, err
		}
		c.bytesRead.Add(size)
		return e.shard.data[off : off+size : off+size], nil
	}
	buf := make([]byte, size)
	if size == 0 {
		return buf, nil
	}
	n, err := e.shard.f.ReadAt(buf, off)
	c.bytesRead.Add(int64(n))
	if err != nil {
		return nil, c.readErr(e, err, off, size, n)
	}
	return buf, nil
}

// checkMapped verifies that the file still holds the whole tensor, so that
// touching the mapping of a file truncated after Open reports an error
// instead of faulting (best effort: it cannot protect views already handed
// out).
func (c *Checkpoint) checkMapped(e entry) error {
	st, err := e.shard.f.Stat()
	if err != nil {
		return wrapf(err, e.shard.path, e.info.Name, "cannot stat")
	}
	if end := e.info.Offset + e.info.Size; st.Size() < end {
		return errf(e.shard.path, e.info.Name, "file truncated to %d bytes after open; tensor data ends at %d", st.Size(), end)
	}
	return nil
}

func (c *Checkpoint) readErr(e entry, err error, off, size int64, n int) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
		return wrapf(err, e.shard.path, e.info.Name, "short read at offset %d: got %d of %d bytes (file truncated?)", off, n, size)
	}
	return wrapf(err, e.shard.path, e.info.Name, "read at offset %d", off)
}

// String describes the checkpoint briefly.
func (c *Checkpoint) String() string {
	return fmt.Sprintf("safetensors.Checkpoint(%s: %d tensors in %d files)", c.path, len(c.tensors), len(c.shards))
}
