package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"math"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

func exchangeSeed(f *testing.F, m proto.Message) []byte {
	f.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		f.Fatal(err)
	}
	return b
}

// FuzzExchangeDecode checks the path of an Exchange message's payload on
// a marshalled ExchangeRequest: checkExchange (what Exchange runs before
// delivering it) never panics and accepts only known kinds with whole
// float32s; the mailbox delivers an accepted message once, intact; and
// decodeF32 (what RecvHidden and AllToAll run on it) refuses any count of
// values but the payload's, and otherwise gives back the payload's
// little-endian float32s bit for bit.
func FuzzExchangeDecode(f *testing.F) {
	one := f32Bytes([]float32{1, -2.5, float32(math.NaN()), float32(math.Inf(-1))})
	for _, s := range []struct {
		req   *workerv1.ExchangeRequest
		delta int8
	}{
		{&workerv1.ExchangeRequest{}, 0},
		{&workerv1.ExchangeRequest{Version: 3, StepId: 7, Kind: kindAllReduce, Index: 2, FromRank: 1, Data: one}, 0},
		{&workerv1.ExchangeRequest{Version: 3, StepId: 7, Kind: kindHidden, Data: one}, 1},
		{&workerv1.ExchangeRequest{Version: 3, StepId: 7, Kind: kindAllToAll, FromRank: 2, Data: one[:8]}, -1},
		{&workerv1.ExchangeRequest{Version: -1, Kind: kindAllToAll, Index: -5, FromRank: -1, Data: one[:4]}, -2},
		{&workerv1.ExchangeRequest{Kind: 3, Data: one}, 0},
		{&workerv1.ExchangeRequest{Kind: -1, Data: one}, 0},
		{&workerv1.ExchangeRequest{Kind: kindHidden, Data: one[:7]}, 0},
		{&workerv1.ExchangeRequest{Kind: kindAllReduce, Data: one[:1]}, 0},
	} {
		f.Add(exchangeSeed(f, s.req), s.delta)
	}
	f.Add([]byte{0xff, 0xff}, int8(0))                // not a message
	f.Add([]byte{0x32, 0x05, 1, 2, 3, 4, 5}, int8(0)) // data of 5 bytes
	f.Add([]byte{0x32, 0x80}, int8(0))                // truncated length
	f.Fuzz(func(t *testing.T, msg []byte, delta int8) {
		req := &workerv1.ExchangeRequest{}
		if err := proto.Unmarshal(msg, req); err != nil {
			return
		}
		err := checkExchange(req)
		known := req.Kind == kindAllReduce || req.Kind == kindHidden || req.Kind == kindAllToAll
		if (err == nil) != (known && len(req.Data)%4 == 0) {
			t.Fatalf("kind %d, %d bytes: %v", req.Kind, len(req.Data), err)
		}
		if err != nil {
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("refused with %v", err)
			}
			return
		}

		// Delivered once, and taken intact.
		var box mailbox
		k := mailKey{req.Version, req.StepId, req.Kind, req.Index, req.FromRank}
		if err := box.put(k, req.Data); err != nil {
			t.Fatal(err)
		}
		if err := box.put(k, req.Data); err == nil {
			t.Fatal("a message delivered twice")
		}
		b, err := box.take(context.Background(), k)
		if err != nil || !bytes.Equal(b, req.Data) {
			t.Fatalf("took %x (%v), put %x", b, err, req.Data)
		}

		// Decoded into the payload's count of values, and no other.
		n := len(b)/4 + int(delta)
		if n < 0 {
			n = 0
		}
		into := make([]float32, n)
		err = decodeF32(b, into)
		if (err == nil) != (4*n == len(b)) {
			t.Fatalf("%d bytes into %d values: %v", len(b), n, err)
		}
		if err != nil {
			return
		}
		for i, v := range into {
			if got, want := math.Float32bits(v), binary.LittleEndian.Uint32(b[4*i:]); got != want {
				t.Fatalf("value %d: %08x, want %08x", i, got, want)
			}
		}
		if !bytes.Equal(f32Bytes(into), b) {
			t.Fatal("re-encoded, the payload changes")
		}
	})
}
