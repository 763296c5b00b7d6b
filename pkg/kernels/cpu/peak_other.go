//go:build !amd64

package cpu

import "errors"

// peakKernelSet: the peak probe has loops for amd64 only.
func peakKernelSet() (peakKernels, error) {
	return peakKernels{}, errors.New("no probe on this architecture")
}
