package grpccode

import (
	"net/http"
	"testing"

	"google.golang.org/grpc/codes"
)

func TestNames(t *testing.T) {
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		if got, ok := ByName(c.String()); !ok || got != c {
			t.Errorf("ByName(%q) = %v, %v", c.String(), got, ok)
		}
		if got, ok := BySnake(Snake(c)); !ok || got != c {
			t.Errorf("BySnake(%q) = %v, %v", Snake(c), got, ok)
		}
	}
	if Snake(codes.ResourceExhausted) != "resource_exhausted" {
		t.Errorf("Snake: %q", Snake(codes.ResourceExhausted))
	}
	if _, ok := ByName("?"); ok {
		t.Error("ByName(?) found a code")
	}
	if _, ok := BySnake("model_not_found"); ok {
		t.Error("BySnake(model_not_found) found a code")
	}
}

// The HTTP status of a code reads back as that code, for every code a
// client can tell apart by status alone.
func TestHTTPRoundTrip(t *testing.T) {
	for _, c := range []codes.Code{codes.InvalidArgument, codes.Unauthenticated, codes.PermissionDenied, codes.NotFound,
		codes.AlreadyExists, codes.ResourceExhausted, codes.Unavailable, codes.DeadlineExceeded} {
		if got := OfHTTPStatus(HTTPStatus(c)); got != c {
			t.Errorf("%v → %d → %v", c, HTTPStatus(c), got)
		}
	}
	if OfHTTPStatus(http.StatusBadGateway) != codes.Unavailable || OfHTTPStatus(http.StatusTeapot) != codes.Internal {
		t.Error("502 or 418")
	}
	if HTTPStatus(codes.Internal) != http.StatusInternalServerError || HTTPStatus(codes.Canceled) != 499 {
		t.Error("Internal or Canceled")
	}
}
