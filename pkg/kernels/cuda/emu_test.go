package cuda

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestKernelsEmulated compiles kernels.cu (the file the backend embeds and
// NVRTC compiles) with g++ through the CPU emulator in emu/, and runs the
// harness that checks every kernel against double-precision loops. No GPU
// or CUDA toolkit is needed, only g++.
func TestKernelsEmulated(t *testing.T) {
	gxx, err := exec.LookPath("g++")
	if err != nil {
		t.Skip("g++ not on PATH")
	}
	// emu/harness.cc includes "../kernels.cu": this directory's kernels.cu.
	for _, f := range []string{"kernels.cu", filepath.Join("emu", "harness.cc"), filepath.Join("emu", "cuda_emu.h")} {
		if _, err := os.Stat(f); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	bin := filepath.Join(t.TempDir(), "harness")
	out, err := exec.CommandContext(ctx, gxx, "-std=c++17", "-O1", "-pthread", "-Wall",
		"-o", bin, filepath.Join("emu", "harness.cc")).CombinedOutput()
	if err != nil {
		t.Fatalf("compiling emu/harness.cc: %v\n%s", err, out)
	}
	if len(out) > 0 {
		t.Logf("g++ warnings:\n%s", out)
	}
	out, err = exec.CommandContext(ctx, bin).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "ALL OK") {
		t.Fatalf("emulated kernels: %v\n%s", err, out)
	}
	t.Logf("emulated kernels:\n%s", out)
}
