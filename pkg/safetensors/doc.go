// Package safetensors reads and writes HuggingFace safetensors checkpoints.
//
// # Format
//
// A safetensors file is an 8-byte little-endian length N, then N bytes of
// UTF-8 JSON (the header), then the raw data section. The header maps each
// tensor name to
//
//	{"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}
//
// where the offsets are relative to the first byte of the data section, plus
// an optional "__metadata__" object of string→string. Tensor data is
// row-major little-endian. Only the F32, F16 and BF16 dtypes are supported.
// ParseHeader validates a header completely (dtype, shape, offsets within
// the data section, size = elements × dtype size, no overlapping tensors,
// metadata types) so that nothing read later can go out of range; a hostile
// header produces an *Error, never a panic or an allocation much larger
// than the header itself. Every error names the file and, where one is
// involved, the tensor:
//
//	safetensors: dir/model-00002-of-00002.safetensors: tensor "model.norm.weight": data_offsets [10, 4] inverted
//
// (the file is named by the path given to Open, joined with the shard name
// for a directory). Errors are *Error values, which wrap any underlying
// error, so errors.Is(err, fs.ErrNotExist) and errors.As work.
//
// # Sharding
//
// Open accepts a single file or a model directory. A sharded checkpoint has
// model.safetensors.index.json, {"metadata": {"total_size": …},
// "weight_map": {name: shard file}}; Open then opens each shard named (base
// names in the same directory) and checks that every tensor of the
// weight_map is in its shard. Without an index, model.safetensors is used if
// present, else every *.safetensors file of the directory. A Checkpoint
// presents all tensors under one sorted name space.
//
// # Slices
//
// Tensor-parallel workers need only part of a tensor. ReadRows reads rows
// [r0, r1) of the first dimension in one contiguous read; ReadCols reads
// columns [c0, c1) of a 2-D tensor, touching only those bytes (one read per
// row, straight into the packed [rows, c1-c0] result, or a single read when
// whole rows are asked for). Neither reads the rest of the file.
//
// # Mmap versus copy
//
// By default reads use os.File.ReadAt into fresh slices that the caller
// owns. With Options{Mmap: true} each file is mapped read-only and Read and
// ReadRows return views into the mapping: no copy, pages are faulted in on
// demand, the slices are valid only until Close and must not be modified.
// ReadCols always returns a copy. (On non-unix platforms Mmap is ignored.)
//
// # Byte counter
//
// BytesRead reports the bytes of tensor data read through a Checkpoint
// (headers excluded): bytes returned by ReadAt, or in Mmap mode the length
// of the views returned plus the bytes copied by ReadCols. Tests use it to
// check that a worker reads only its slice. The counter is atomic; a
// Checkpoint may be read from several goroutines at once.
//
// # Writing
//
// Create writes a header for a declared list of tensors and returns a
// Writer that streams the data through a fixed-size buffer, so multi-GB
// random-weight checkpoints can be written in bounded memory. WriteFile is
// the convenience form for small files, and WriteIndex writes the index of
// a sharded checkpoint. The conversion helpers (BF16ToFloat32,
// Float32ToBF16, F16ToFloat32, Float32ToF16, DecodeFloat32, EncodeFloat32)
// convert between the stored half-precision formats and float32, rounding
// to nearest even.
package safetensors
