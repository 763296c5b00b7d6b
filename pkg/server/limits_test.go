package server

import (
	"errors"
	"testing"
	"time"
)

// TestBoundedSender: a Send the client does not take within the timeout
// fails with errSendTimeout, and every later one at once; the goroutine
// ends once the pending send returns after Close.
func TestBoundedSender(t *testing.T) {
	unblock := make(chan struct{})
	sent := make(chan int, 4)
	returned := make(chan struct{})
	b := newBoundedSender(func(m int) error {
		if m == 2 { // the client stops reading
			<-unblock
			close(returned)
			return errors.New("stream canceled")
		}
		sent <- m
		return nil
	}, 50*time.Millisecond)
	if err := b.Send(1); err != nil || <-sent != 1 {
		t.Fatalf("first send: %v", err)
	}
	t0 := time.Now()
	if err := b.Send(2); !errors.Is(err, errSendTimeout) {
		t.Fatalf("blocked send: %v, want errSendTimeout", err)
	}
	if d := time.Since(t0); d < 50*time.Millisecond || d > 5*time.Second {
		t.Fatalf("blocked send gave up after %v, want about 50ms", d)
	}
	if err := b.Send(3); !errors.Is(err, errSendTimeout) {
		t.Fatalf("send after a timeout: %v, want errSendTimeout at once", err)
	}
	b.Close()
	close(unblock) // grpc cancels the stream once the handler returns
	select {
	case <-returned:
	case <-time.After(5 * time.Second):
		t.Fatal("the pending send never returned")
	}
}
