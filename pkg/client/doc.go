// Package client is the Go client of a qwenfleet cluster's public gRPC API
// (proto/qwenfleet/v1, service Generator). qwenctl and the tests use it; any
// Go program that sends requests to a cluster should.
//
// A cluster runs one or more coordinators: one leader, which serves, and
// standbys, which answer Generate with UNAVAILABLE ("this coordinator is a
// standby; the leader is at ...") and take over when the leader dies. The
// Client hides that: it finds the leader, sends every call there, and when
// the leader goes away in the middle of a request it finds the new one and
// resumes the request where its stream broke, so the caller sees every
// generated token exactly once.
//
// # Use
//
//	c, err := client.New(client.Config{Addrs: []string{"10.0.0.1:50051", "10.0.0.2:50051"}})
//	if err != nil { ... }
//	defer c.Close()
//	res, err := c.Generate(ctx, req, func(ch *pb.GenerateChunk) error {
//		fmt.Print(ch.Text) // new text only, also across a resume
//		return nil
//	})
//	// res.TokenIDs, res.Text: all of it; res.Complete: the final message.
//
// # Connections
//
// The Client keeps one grpc.ClientConn per known coordinator address: the
// configured Addrs, and any leader address a coordinator or etcd names
// later. All of them are dialed by DialWith, the one place that decides the
// transport: TLS with Config.TLS (TLSConfigFromCA trusts the cluster CA's
// ca.pem and checks each connection's dialled host, by name or IP
// address), plaintext without it; and Config.APIKey, sent with every call
// as "authorization: Bearer <key>" (coordinators with --api-keys refuse a
// call without a valid key UNAUTHENTICATED, which is returned at once, not
// retried, also when it is the answer of the leader search). Client-side
// keepalive pings an idle stream's connection no more often than every 20 s
// (Config.KeepaliveTime), and never a connection without streams, so a
// server's keepalive enforcement never closes it.
//
// # Finding the leader
//
// The leader is cached. When none is cached, the Client asks every known
// coordinator GetServerInfo at once (each with Config.InfoTimeout, 2 s by
// default) and takes the first, in the order of the known list, that says
// leader. A leader_address it has not seen before (from a standby, or from
// an UNAVAILABLE message naming the leader) is added to the known list and
// asked in turn. When no coordinator says leader and Config.EtcdEndpoints are
// given, the election key under Config.Prefix (the servers' --prefix) names
// the leader (pkg/cluster's Store.Leader); that address is added and asked
// too. A call to the cached leader that fails with UNAVAILABLE forgets it.
//
// # Retries and resume
//
// Every call retries while it fails with UNAVAILABLE: it forgets the
// leader, waits (100 ms, doubling to at most 1 s), finds the leader again and
// sends the call again, for at most Config.RetryTimeout (60 s by default)
// from its first failure (a Generate stream that received tokens since
// starts that clock anew: a long generation may be resumed several times).
// Then, or when the next try would start after ctx's deadline, it gives up
// with a *GaveUpError, which wraps ErrGaveUp and the last failure (status.Code
// of it is the last failure's code, UNAVAILABLE). Any other status
// (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND, ALREADY_EXISTS, ...) is
// returned at once, unretried, as the gRPC status error. When the caller's
// ctx ends, the call returns ctx's error.
//
// Generate gives a request a random request_id when it has none: a resumed
// request must name the request it continues. A Generate stream is broken
// when the call's status is UNAVAILABLE, when Recv fails with UNAVAILABLE,
// with CANCELED that the caller did not cause, or with io.ErrUnexpectedEOF,
// or when the server sends a GenerateError whose code is "Unavailable".
// The Client then sends the same request again with resume set:
// resume.token_ids are all the generated token ids received so far (every
// chunk's token_ids, concatenated) and resume.text_bytes the bytes of text
// received so far. The server recomputes the KV of the prompt and those
// tokens and continues; its chunks carry only new tokens and text, and its
// final usage counts all generated tokens. A greedy or seeded request so
// ends with the tokens an undisturbed run gives.
//
// Generate calls onChunk with each chunk as it arrives; the Result holds
// everything received (token ids, text, logprobs), the final
// GenerateComplete, and for each break when it happened and when the first
// token after it arrived. A failed Generate returns what it received too.
//
// ServerInfo, ModelInfo and Tokenize are idempotent and retried the same
// way. Coordinators and Stub give access to the connections for the RPCs
// this package does not wrap (HealthCheck, Drain, ...).
//
// A Client is safe for concurrent use. Close closes its connections; calls
// in flight then fail.
package client
