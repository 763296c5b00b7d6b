//go:build unix

package safetensors

import (
	"os"
	"syscall"
)

// mmapSupported reports whether Options.Mmap can be honoured on this OS.
const mmapSupported = true

// mmapFile maps size bytes of f read-only and shared.
func mmapFile(f *os.File, size int) ([]byte, error) {
	return syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ, syscall.MAP_SHARED)
}

func munmap(b []byte) error { return syscall.Munmap(b) }
