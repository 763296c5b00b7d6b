package server

import (
	"context"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// TestWorkerRejectsBadExperts sends a worker expert placements that do not
// fit its model: each is an INVALID_ARGUMENT or FAILED_PRECONDITION naming
// the field, and the worker keeps serving.
func TestWorkerRejectsBadExperts(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	dir := filepath.Join(filepath.Dir(file), "..", "..", "testdata", "qwen2-ref", "moe-64x8") // 2 layers, 64 experts
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	workerv1.RegisterWorkerServer(gs, NewWorkerService(WorkerOptions{}))
	go gs.Serve(lis)
	defer gs.Stop()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := workerv1.NewWorkerClient(conn)
	ctx := context.Background()
	oneLayer, _ := expertparallel.Contiguous(1, 64, 2)
	threeRanks, _ := expertparallel.Contiguous(2, 64, 3)
	for _, tc := range []struct {
		name    string
		experts []int32
		want    string
	}{
		{"too few layers", oneLayer.Flat(), "assignment.experts"},
		{"other ranks", threeRanks.Flat(), "3 ranks for ep_size 2"},
		{"garbage", []int32{2, 2, 64, 9}, "assignment.experts"},
	} {
		a := &workerv1.Assignment{Version: 1, Model: dir, TpSize: 1, EpSize: 2, EpRank: 1,
			TpPeers: []string{"127.0.0.1:1", "127.0.0.1:2"}, Experts: tc.experts}
		s, err := client.Load(ctx, &workerv1.LoadRequest{Assignment: a})
		if err == nil {
			_, err = s.Recv()
		}
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want INVALID_ARGUMENT with %q", tc.name, err, tc.want)
		}
	}
	_, err = client.SetExperts(ctx, &workerv1.SetExpertsRequest{AssignmentVersion: 1, ExpertsVersion: 2, Experts: oneLayer.Flat()})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("SetExperts with no model: %v", err)
	}
	if _, err := client.Health(ctx, &workerv1.HealthRequest{}); err != nil {
		t.Fatalf("the worker stopped serving: %v", err)
	}
}
