package server

import (
	"context"
	"encoding/binary"
	"io"
	"math"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// exchangeIn is an Exchange stream that delivers reqs, then io.EOF.
type exchangeIn struct {
	grpc.ServerStream
	reqs []*workerv1.ExchangeRequest
}

func (s *exchangeIn) Recv() (*workerv1.ExchangeRequest, error) {
	if len(s.reqs) == 0 {
		return nil, io.EOF
	}
	r := s.reqs[0]
	s.reqs = s.reqs[1:]
	return r, nil
}

func (s *exchangeIn) SendAndClose(*workerv1.ExchangeResponse) error { return nil }

// nullPeer is a peer's client whose Exchange streams take every message
// and drop it.
type nullPeer struct{ workerv1.WorkerClient }

type nullStream struct{ grpc.ClientStream }

func (nullPeer) Exchange(context.Context, ...grpc.CallOption) (grpc.ClientStreamingClient[workerv1.ExchangeRequest, workerv1.ExchangeResponse], error) {
	return nullStream{}, nil
}
func (nullStream) Send(*workerv1.ExchangeRequest) error { return nil }
func (nullStream) CloseAndRecv() (*workerv1.ExchangeResponse, error) {
	return &workerv1.ExchangeResponse{}, nil
}

// FuzzExchangeDecode sends a worker's Exchange RPC one protobuf-encoded
// message and has the step that waits for it decode it into floats: the
// all-reduce of n values (rank 1-from of two), the hidden states of a
// stage (rank from), or the combine of an expert-parallel stage of two
// ranks (rows×width values, over two all-to-alls; the second message,
// which the first one's sender would send, is well formed). It never
// panics; Exchange refuses (INVALID_ARGUMENT) a kind other than 0, 1 or 2
// and data that is not whole float32s; every size that does not match
// what the step expects is an error; an accepted all-reduce adds the part,
// and hidden states are the data's floats.
func FuzzExchangeDecode(f *testing.F) {
	f32 := func(v ...float32) []byte {
		b := make([]byte, 4*len(v))
		for i, x := range v {
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
		}
		return b
	}
	bits := func(v uint32) float32 { return math.Float32frombits(v) }
	seeds := []struct {
		req         *workerv1.ExchangeRequest
		n           uint16
		rows, width uint8
	}{
		{&workerv1.ExchangeRequest{Version: 1, StepId: 1, Kind: kindAllReduce, FromRank: 0, Data: f32(1, 2, 3)}, 3, 0, 0},
		{&workerv1.ExchangeRequest{Version: 1, StepId: 1, Kind: kindAllReduce, FromRank: 1, Index: 4, Data: f32(1, 2, 3)}, 2, 0, 0},
		{&workerv1.ExchangeRequest{Kind: kindAllReduce, Data: []byte{1, 2, 3}}, 1, 0, 0},
		{&workerv1.ExchangeRequest{Kind: kindHidden, FromRank: 3, Data: f32(0.5, -1)}, 2, 0, 0},
		{&workerv1.ExchangeRequest{Kind: kindHidden, Index: 1, Data: f32(0.5)}, 1, 0, 0},
		{&workerv1.ExchangeRequest{Kind: kindAllToAll, FromRank: 1, Data: f32(bits(1), bits(0), 1, 2)}, 0, 4, 2},
		{&workerv1.ExchangeRequest{Kind: kindAllToAll, FromRank: 0, Data: f32(bits(1), bits(3), 1, 2)}, 0, 4, 2},
		{&workerv1.ExchangeRequest{Kind: kindAllToAll, FromRank: 1, Data: f32(bits(0))}, 0, 4, 2},
		{&workerv1.ExchangeRequest{Kind: kindAllToAll, FromRank: 1, Data: f32(bits(0xffffffff), 1)}, 0, 4, 2},
		{&workerv1.ExchangeRequest{Kind: kindAllToAll, FromRank: 1}, 0, 3, 1},
		{&workerv1.ExchangeRequest{Kind: 7, Data: f32(1)}, 1, 0, 0},
		{&workerv1.ExchangeRequest{Kind: -1}, 0, 0, 0},
	}
	for _, s := range seeds {
		b, err := proto.Marshal(s.req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, s.n, s.rows, s.width)
	}
	f.Fuzz(func(t *testing.T, raw []byte, n uint16, rows, width uint8) {
		req := &workerv1.ExchangeRequest{}
		if proto.Unmarshal(raw, req) != nil {
			return
		}
		// The decoder itself: exactly 4 bytes a value.
		if err := decodeF32(req.Data, make([]float32, n)); (err == nil) != (len(req.Data) == 4*int(n)) {
			t.Fatalf("decodeF32 of %d bytes into %d values: %v", len(req.Data), n, err)
		}
		w := &WorkerService{version: req.Version}
		err := w.Exchange(&exchangeIn{reqs: []*workerv1.ExchangeRequest{req}})
		ok := (req.Kind == kindAllReduce || req.Kind == kindHidden || req.Kind == kindAllToAll) && len(req.Data)%4 == 0
		if !ok {
			if status.Code(err) != codes.InvalidArgument || len(w.box.boxes) != 0 {
				t.Fatalf("kind %d with %d bytes: %v, %d messages kept", req.Kind, len(req.Data), err, len(w.box.boxes))
			}
			return
		}
		if err != nil || len(w.box.boxes) != 1 {
			t.Fatalf("kind %d with %d bytes: %v, %d messages kept", req.Kind, len(req.Data), err, len(w.box.boxes))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		from := int(req.FromRank)
		two := func(own int) *peers {
			p := &peers{rank: own, tp: make([]*peer, 2), group: 2, cancel: func() {}}
			p.tp[1-own] = &peer{client: nullPeer{}, ctx: ctx, turn: make(chan struct{}, 1)}
			return p
		}
		link := &stepLink{ctx: ctx, box: &w.box, version: req.Version, step: req.StepId}
		switch req.Kind {
		case kindAllReduce:
			if from != 0 && from != 1 {
				return // for no rank of a group of two
			}
			link.p, link.n = two(1-from), req.Index
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(i)
			}
			err := link.AllReduce(x)
			if (err == nil) != (len(req.Data) == 4*int(n)) {
				t.Fatalf("all-reduce of %d values took %d bytes: %v", n, len(req.Data), err)
			}
			if err != nil {
				return
			}
			for i, v := range x {
				var want float32
				part := math.Float32frombits(binary.LittleEndian.Uint32(req.Data[4*i:]))
				if from == 0 {
					want = want + part + float32(i)
				} else {
					want = want + float32(i) + part
				}
				if math.Float32bits(v) != math.Float32bits(want) && !(v != v && want != want) {
					t.Fatalf("all-reduce value %d: %v, want %v", i, v, want)
				}
			}
		case kindHidden:
			if req.Index != 0 {
				return // hidden states are message 0 of their step
			}
			link.p = &peers{rank: from, cancel: func() {}}
			h, err := link.RecvHidden()
			if err != nil || 4*len(h) != len(req.Data) {
				t.Fatalf("%d values of hidden states from %d bytes: %v", len(h), len(req.Data), err)
			}
			for i, v := range h {
				if math.Float32bits(v) != binary.LittleEndian.Uint32(req.Data[4*i:]) {
					t.Fatalf("hidden value %d differs", i)
				}
			}
		case kindAllToAll:
			if from != 0 && from != 1 || width == 0 {
				return
			}
			own, T, H := 1-from, int(rows), int(width)
			link.p, link.a = two(own), req.Index
			home := func(h int) (lo, hi int) { return h * T / 2, (h + 1) * T / 2 }
			// The sender's second message: the sums of its home rows.
			flo, fhi := home(from)
			if err := w.box.put(mailKey{req.Version, req.StepId, kindAllToAll, req.Index + 1, req.FromRank},
				make([]byte, 4*(fhi-flo)*H)); err != nil {
				return // the same key as the first (never: the index differs)
			}
			x := make([]float32, T*H)
			st := &expertparallel.Stage{Exchanger: link, Rank: own, Size: 2}
			err := st.ReduceStage(x, H, nil)
			// The part is [k, k rows of own's home, k·H values].
			lo, hi := home(own)
			m := len(req.Data) / 4
			valid := m >= 1
			if valid {
				k := int(binary.LittleEndian.Uint32(req.Data))
				valid = k <= hi-lo && m == 1+k+k*H
				for i := 0; valid && i < k; i++ {
					r := int(binary.LittleEndian.Uint32(req.Data[4*(1+i):]))
					valid = r >= lo && r < hi
				}
			}
			if (err == nil) != valid {
				t.Fatalf("combine of %d rows of %d on rank %d, part of %d values: %v", T, H, own, m, err)
			}
		}
		if cerr := ctx.Err(); cerr != nil {
			t.Fatalf("a step waited for a message it had: %v", cerr)
		}
	})
}
