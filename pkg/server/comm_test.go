package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// linkedPair starts n worker services on loopback gRPC servers, each with
// peers pointing at the others as one tensor-parallel group.
func linkedGroup(t testing.TB, n int) ([]*WorkerService, []*peers) {
	t.Helper()
	var addrs []string
	var svcs []*WorkerService
	for range n {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s := NewWorkerService(WorkerOptions{})
		gs := grpc.NewServer(append(PeerServerOptions(PeerConfig{}), grpc.MaxRecvMsgSize(256<<20))...)
		workerv1.RegisterWorkerServer(gs, s)
		go gs.Serve(lis)
		t.Cleanup(gs.Stop)
		addrs = append(addrs, lis.Addr().String())
		svcs = append(svcs, s)
	}
	var ps []*peers
	for r := range n {
		p, err := dialPeers(&workerv1.Assignment{TpRank: int32(r), TpSize: int32(n), TpPeers: addrs}, PeerConfig{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.close)
		ps = append(ps, p)
	}
	return svcs, ps
}

// TestAllReduceOverGRPC: every rank ends with the same sum, added in rank
// order, over many consecutive all-reduces and steps.
func TestAllReduceOverGRPC(t *testing.T) {
	for _, n := range []int{2, 3} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			svcs, ps := linkedGroup(t, n)
			for step := uint64(1); step <= 3; step++ {
				out := make([][]float32, n)
				errs := make([]error, n)
				var wg sync.WaitGroup
				for r := range n {
					wg.Go(func() {
						l := &stepLink{ctx: context.Background(), box: &svcs[r].box, p: ps[r], step: step}
						for k := 0; k < 5; k++ {
							x := []float32{float32(r + 1), 0.1 * float32(r), float32(k)}
							if errs[r] = l.AllReduce(x); errs[r] != nil {
								return
							}
							out[r] = x
						}
					})
				}
				wg.Wait()
				for r := range n {
					if errs[r] != nil {
						t.Fatal(errs[r])
					}
					var want [3]float32
					for q := range n {
						want[0] += float32(q + 1)
						want[1] += 0.1 * float32(q)
						want[2] += 4
					}
					if [3]float32(out[r]) != want {
						t.Fatalf("rank %d: %v, want %v", r, out[r], want)
					}
				}
			}
		})
	}
}

// BenchmarkAllReduce is the latency of one all-reduce between two local
// ranks of the qwen2-0.5b shape's hidden rows (896 floats each): one
// decode row, 16 rows (a batch of decodes) and 512 (a prefill chunk).
func BenchmarkAllReduce(b *testing.B) {
	svcs, ps := linkedGroup(b, 2)
	for _, rows := range []int{1, 16, 512} {
		b.Run(fmt.Sprintf("rows=%d", rows), func(b *testing.B) {
			x := make([][]float32, 2)
			for r := range x {
				x[r] = make([]float32, 896*rows)
			}
			var wg sync.WaitGroup
			step := uint64(rows) << 32 // fresh mail keys per sub-benchmark
			for r := range 2 {
				wg.Go(func() {
					l := &stepLink{ctx: context.Background(), box: &svcs[r].box, p: ps[r], step: step}
					for i := 0; i < b.N; i++ {
						if err := l.AllReduce(x[r]); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
		})
	}
}

// hungWorker is a peer that takes Exchange streams and never reads them:
// a stopped process, as its senders see it once the flow-control window
// is full.
type hungWorker struct {
	workerv1.UnimplementedWorkerServer
	release chan struct{}
}

func (h *hungWorker) Exchange(s workerv1.Worker_ExchangeServer) error {
	select {
	case <-h.release:
	case <-s.Context().Done():
	}
	return nil
}

// TestSendsEndWithTheStep: sends to a peer that stopped reading, of
// messages past the flow-control window, end with the step's context (the
// stream is reset), so a step never outlives its deadline and never holds
// the worker's lifecycle lock past it. Without the bound the second send
// blocks until the peer reads, that is forever.
func TestSendsEndWithTheStep(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := PeerConfig{Window: 64 << 10}
	h := &hungWorker{release: make(chan struct{})}
	gs := grpc.NewServer(append(PeerServerOptions(cfg), grpc.MaxRecvMsgSize(256<<20))...)
	workerv1.RegisterWorkerServer(gs, h)
	go gs.Serve(lis)
	defer gs.Stop()
	defer close(h.release)
	p, err := dialPeers(&workerv1.Assignment{TpRank: 0, TpSize: 2, TpPeers: []string{"127.0.0.1:1", lis.Addr().String()}}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	var box mailbox
	x := make([]float32, 512*64) // a 512-token chunk of 64-wide rows: 128 KiB
	for step := uint64(1); step <= 3; step++ {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		l := &stepLink{ctx: ctx, box: &box, p: p, step: step}
		done := make(chan error, 1)
		t0 := time.Now()
		go func() {
			var err error
			for range 4 { // a step's all-reduces, until one fails
				if err = l.AllReduce(x); err != nil {
					break
				}
			}
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil || !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("step %d: %v, want the step's deadline", step, err)
			}
			if d := time.Since(t0); d > 3*time.Second {
				t.Fatalf("step %d ended %v after it started, past its 300ms deadline", step, d)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("step %d: an all-reduce to a peer that does not read is still blocked 10s after the step's 300ms deadline", step)
		}
		cancel()
	}
	// Sends taking their turn wait no longer than their context either.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	for range 3 {
		if err := p.tp[1].send(ctx, &workerv1.ExchangeRequest{Data: f32Bytes(x)}); err == nil {
			continue
		}
	}
	if ctx.Err() == nil {
		t.Fatalf("three sends of 128 KiB to a peer that does not read all succeeded")
	}
}
