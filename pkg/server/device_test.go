package server_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestGPUWorkerWithoutGPU starts workers with --device cuda:0 on a machine
// without a CUDA driver: the default build says it has no CUDA backend, a
// -tags cuda build says "no CUDA driver"; both exit non-zero at once and
// never serve on the CPU instead.
func TestGPUWorkerWithoutGPU(t *testing.T) {
	needE2E(t)
	if _, err := os.Stat("/dev/nvidia0"); err == nil {
		t.Skip("this machine has a GPU")
	}
	cudaBin := filepath.Join(t.TempDir(), "worker-cuda")
	build := exec.Command("go", "build", "-tags", "cuda", "-o", cudaBin, "./cmd/worker")
	build.Dir = repoRoot()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build -tags cuda: %v\n%s", err, out)
	}
	for _, tc := range []struct{ bin, want string }{
		{filepath.Join(binDir, "worker"), "built without the CUDA backend"},
		{cudaBin, "no CUDA driver"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, err := exec.CommandContext(ctx, tc.bin, "--device", "cuda:0", "--etcd-endpoints", "127.0.0.1:1").CombinedOutput()
		timedOut := ctx.Err() != nil
		cancel()
		if err == nil || timedOut || !strings.Contains(string(out), tc.want) {
			t.Errorf("%s --device cuda:0: %v, output %q; want a quick failure saying %q", filepath.Base(tc.bin), err, out, tc.want)
		}
	}
	out, err := exec.Command(filepath.Join(binDir, "worker"), "--device", "tpu:1", "--etcd-endpoints", "127.0.0.1:1").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--device") {
		t.Errorf("--device tpu:1: %v, %q", err, out)
	}
}
