// Package grpccode names gRPC status codes the ways the project's wire
// formats write them: a code's Go name (ResourceExhausted, as a Generate
// stream's error carries it), its snake-case name (resource_exhausted, the
// code field of the OpenAI-compatible API's errors), and the HTTP status
// the OpenAI-compatible API answers a code with and a client reads back.
// The server and its clients (pkg/client, qwenctl bench --http) share it,
// so the two directions cannot drift apart.
package grpccode

import (
	"net/http"
	"strings"

	"google.golang.org/grpc/codes"
)

// ByName is the code whose String() is name.
func ByName(name string) (codes.Code, bool) {
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		if c.String() == name {
			return c, true
		}
	}
	return codes.Unknown, false
}

// Snake is c's name in snake case (invalid_argument).
func Snake(c codes.Code) string {
	var b strings.Builder
	for i, r := range c.String() {
		if r >= 'A' && r <= 'Z' {
			if i > 0 {
				b.WriteByte('_')
			}
			r += 'a' - 'A'
		}
		b.WriteRune(r)
	}
	return b.String()
}

// BySnake is the code whose Snake name is s.
func BySnake(s string) (codes.Code, bool) {
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		if Snake(c) == s {
			return c, true
		}
	}
	return codes.Unknown, false
}

// HTTPStatus is the HTTP status the OpenAI-compatible API answers c with.
func HTTPStatus(c codes.Code) int {
	switch c {
	case codes.InvalidArgument, codes.FailedPrecondition, codes.OutOfRange:
		return http.StatusBadRequest
	case codes.Unauthenticated:
		return http.StatusUnauthorized
	case codes.PermissionDenied:
		return http.StatusForbidden
	case codes.NotFound:
		return http.StatusNotFound
	case codes.AlreadyExists, codes.Aborted:
		return http.StatusConflict
	case codes.ResourceExhausted:
		return http.StatusTooManyRequests
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	case codes.DeadlineExceeded:
		return http.StatusGatewayTimeout
	case codes.Canceled:
		return 499 // the client closed the request (nginx's code); it reads nothing
	case codes.Unimplemented:
		return http.StatusNotImplemented
	}
	return http.StatusInternalServerError
}

// OfHTTPStatus is the code an HTTP status stands for, for a client reading
// an error with no code field (the first code HTTPStatus maps to it; a
// gateway's 502 is Unavailable too); Internal for any other status.
func OfHTTPStatus(s int) codes.Code {
	switch s {
	case http.StatusBadRequest:
		return codes.InvalidArgument
	case http.StatusUnauthorized:
		return codes.Unauthenticated
	case http.StatusForbidden:
		return codes.PermissionDenied
	case http.StatusNotFound:
		return codes.NotFound
	case http.StatusConflict:
		return codes.AlreadyExists
	case http.StatusTooManyRequests:
		return codes.ResourceExhausted
	case http.StatusServiceUnavailable, http.StatusBadGateway:
		return codes.Unavailable
	case http.StatusGatewayTimeout:
		return codes.DeadlineExceeded
	}
	return codes.Internal
}
