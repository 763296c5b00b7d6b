//go:build unix

package cpu

import (
	"syscall"
	"unsafe"
)

// mapFloats maps n zeroed float32 values outside the Go heap (anonymous
// private memory: pages are committed when first written).
func mapFloats(n int) ([]float32, bool) {
	if n == 0 {
		return nil, false
	}
	mem, err := syscall.Mmap(-1, 0, 4*n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return nil, false
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(&mem[0])), n), true
}

// unmapFloats releases what mapFloats returned.
func unmapFloats(f []float32) {
	if len(f) == 0 {
		return
	}
	syscall.Munmap(unsafe.Slice((*byte)(unsafe.Pointer(&f[0])), 4*len(f)))
}
