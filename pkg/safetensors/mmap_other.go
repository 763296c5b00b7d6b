//go:build !unix

package safetensors

import (
	"errors"
	"os"
)

// mmapSupported reports whether Options.Mmap can be honoured on this OS.
const mmapSupported = false

func mmapFile(f *os.File, size int) ([]byte, error) {
	return nil, errors.New("mmap is not supported on this platform")
}

func munmap(b []byte) error { return nil }
