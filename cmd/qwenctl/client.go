package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/client"
	"github.com/qwenfleet/qwenfleet/pkg/security"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// APIKeyEnv is the environment variable --api-key defaults to.
const APIKeyEnv = "QWENFLEET_API_KEY"

// securityFlags are how a command reaches a coordinator securely: TLS
// verified against a cluster CA, and an API key.
type securityFlags struct {
	tlsDir, apiKey, apiKeyFile *string
}

func addSecurityFlags(fs *flag.FlagSet) securityFlags {
	return securityFlags{
		tlsDir: fs.String("tls-dir", "", "connect with TLS, verifying the coordinator against DIR/"+security.CAFile+" (the cluster CA: qwenctl certs writes it); no client certificate is needed. Default: plaintext"),
		// The key is never a flag default: -h would print it.
		apiKey:     fs.String("api-key", "", "the API key sent to the coordinator (default: --api-key-file's, else $"+APIKeyEnv+", which keeps it out of the process list)"),
		apiKeyFile: fs.String("api-key-file", "", "read the API key from FILE (white space around it is ignored; a mounted Secret, the key never on a command line)"),
	}
}

// key is the API key of the flags: --api-key, --api-key-file's content or
// $QWENFLEET_API_KEY ("": none). Errors never repeat the key.
func (f securityFlags) key() (string, error) {
	key, from := *f.apiKey, "--api-key"
	switch {
	case *f.apiKeyFile != "" && key != "":
		return "", usagef("--api-key and --api-key-file: give one")
	case *f.apiKeyFile != "":
		b, err := os.ReadFile(*f.apiKeyFile)
		if err != nil {
			return "", usagef("--api-key-file: %v", err)
		}
		if key, from = strings.TrimSpace(string(b)), "--api-key-file "+*f.apiKeyFile; key == "" {
			return "", usagef("%s: the file holds no key", from)
		}
	case key == "":
		key, from = os.Getenv(APIKeyEnv), "$"+APIKeyEnv
	}
	if strings.TrimSpace(key) != key || strings.ContainsAny(key, " \t\r\n") {
		return "", usagef("%s: white space in the key", from) // never the key itself
	}
	return key, nil
}

// config is the TLS configuration (nil: plaintext) and the API key ("" :
// none) of the flags.
func (f securityFlags) config() (*tls.Config, string, error) {
	key, err := f.key()
	if err != nil {
		return nil, "", err
	}
	if *f.tlsDir == "" {
		return nil, key, nil
	}
	ca := filepath.Join(*f.tlsDir, security.CAFile)
	if _, err := os.Stat(ca); err != nil {
		return nil, "", usagef("--tls-dir: %s: %v (qwenctl certs --out %s writes the cluster CA there)", ca, errors.Unwrap(err), *f.tlsDir)
	}
	cfg, err := client.TLSConfigFromCA(ca)
	if err != nil {
		return nil, "", fmt.Errorf("--tls-dir: %w", err)
	}
	return cfg, key, nil
}

// dial connects to the one coordinator at addr (the commands that talk to
// one coordinator: drain, experts).
func dial(addr string, sf securityFlags) (*grpc.ClientConn, pb.GeneratorClient, error) {
	if addr == "" {
		return nil, nil, usagef("--addr HOST:PORT is required")
	}
	tlsCfg, key, err := sf.config()
	if err != nil {
		return nil, nil, err
	}
	conn, err := client.DialWith(addr, tlsCfg, key, client.DefaultKeepaliveTime)
	if err != nil {
		return nil, nil, fmt.Errorf("--addr %s: %w", addr, err)
	}
	return conn, pb.NewGeneratorClient(conn), nil
}

// parseList splits a comma-separated flag value; an empty item is a usage
// error naming the flag.
func parseList(flagName, v string) ([]string, error) {
	if strings.TrimSpace(v) == "" {
		return nil, nil
	}
	var out []string
	for _, a := range strings.Split(v, ",") {
		a = strings.TrimSpace(a)
		if a == "" {
			return nil, usagef("--%s: empty item in %q", flagName, v)
		}
		out = append(out, a)
	}
	return out, nil
}

// clusterFlags are the flags that say how to reach a cluster's leader.
type clusterFlags struct {
	addr, etcd, prefix *string
	retry              *time.Duration
	sec                securityFlags
}

func addClusterFlags(fs *flag.FlagSet) clusterFlags {
	return clusterFlags{
		sec:    addSecurityFlags(fs),
		addr:   fs.String("addr", "127.0.0.1:50051", "coordinator addresses, comma separated (the leader is found among them)"),
		etcd:   fs.String("etcd-endpoints", "", "the cluster's etcd endpoints, comma separated: the leader's address is also read there"),
		prefix: fs.String("prefix", "/qwenfleet/", "the cluster's etcd key prefix (with --etcd-endpoints)"),
		retry:  fs.Duration("retry-timeout", client.DefaultRetryTimeout, "how long a request keeps retrying while no coordinator serves it (a failover) before it fails"),
	}
}

// connect makes the client library's Client from the flags.
func (f clusterFlags) connect() (*client.Client, error) {
	addrs, err := parseList("addr", *f.addr)
	if err != nil {
		return nil, err
	}
	etcd, err := parseList("etcd-endpoints", *f.etcd)
	if err != nil {
		return nil, err
	}
	if len(addrs) == 0 && len(etcd) == 0 {
		return nil, usagef("--addr HOST:PORT is required")
	}
	if *f.retry <= 0 {
		return nil, usagef("--retry-timeout: must be > 0")
	}
	tlsCfg, key, err := f.sec.config()
	if err != nil {
		return nil, err
	}
	if len(etcd) > 0 && strings.HasPrefix(etcd[0], "https://") {
		// A secured etcd takes coordinators' and workers' certificates
		// only (it holds the placement's secrets and the election).
		return nil, usagef("--etcd-endpoints: an https:// etcd takes only the cluster's coordinator and worker certificates; name the coordinators with --addr instead")
	}
	return client.New(client.Config{Addrs: addrs, EtcdEndpoints: etcd, Prefix: *f.prefix, RetryTimeout: *f.retry, TLS: tlsCfg, APIKey: key})
}

// rpcError makes a gRPC error one readable line.
func rpcError(err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		err = status.FromContextError(err).Err()
	}
	if s, ok := status.FromError(err); ok {
		return fmt.Errorf("%s: %s", s.Code(), s.Message())
	}
	return err
}

// clamp32 saturates an int flag to int32 (the server then names the field
// when the value is out of its range).
func clamp32(v int) *int32 {
	x := int32(max(min(v, math.MaxInt32), math.MinInt32))
	return &x
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

type generateJSON struct {
	ID             string     `json:"request_id"`
	IDs            []int32    `json:"ids"`
	Text           string     `json:"text"`
	FinishReason   string     `json:"finish_reason"`
	MatchedStop    string     `json:"matched_stop,omitempty"`
	Usage          *pb.Usage  `json:"usage"`
	Logprobs       []lpJSON   `json:"logprobs,omitempty"`
	PromptLogprobs []*float64 `json:"prompt_logprobs,omitempty"`
	Preemptions    int32      `json:"preemptions,omitempty"`
}

type lpJSON struct {
	ID      int32       `json:"id"`
	Logprob float32     `json:"logprob"`
	Top     []topLpJSON `json:"top,omitempty"`
}

type topLpJSON struct {
	ID      int32   `json:"id"`
	Token   string  `json:"token,omitempty"`
	Logprob float32 `json:"logprob"`
}

func runGenerate(args []string) error {
	fs := newFlags("generate", "--addr HOST:PORT[,HOST:PORT...] [--etcd-endpoints URLS] [--tls-dir DIR] [--api-key KEY | --api-key-file FILE] (--prompt TEXT | --chat TEXT | --ids 1,2,3) [flags]")
	cf := addClusterFlags(fs)
	prompt := fs.String("prompt", "", "prompt text")
	chat := fs.String("chat", "", "a user message, sent through the chat template")
	system := fs.String("system", "", "system message for --chat")
	ids := fs.String("ids", "", "prompt token ids, comma separated")
	maxTokens := fs.Int("max-tokens", -1, "tokens to generate (default: the server's)")
	minTokens := fs.Int("min-tokens", 0, "tokens to generate before EOS or stop ids may end it")
	temperature := fs.Float64("temperature", 1, "0 = greedy")
	topP := fs.Float64("top-p", 1, "nucleus sampling mass in (0, 1]")
	topK := fs.Int("top-k", 0, "keep the K most likely tokens (0: all)")
	minP := fs.Float64("min-p", 0, "drop tokens below min-p times the top probability")
	repPen := fs.Float64("repetition-penalty", 1, "HF/vLLM repetition penalty (1: off)")
	presPen := fs.Float64("presence-penalty", 0, "OpenAI presence penalty")
	freqPen := fs.Float64("frequency-penalty", 0, "OpenAI frequency penalty")
	seed := fs.Int64("seed", 0, "sampling seed (reproducible when set)")
	var stops stringList
	fs.Var(&stops, "stop", "stop string (repeatable)")
	stopIDs := fs.String("stop-token-ids", "", "token ids that stop generation, comma separated")
	ignoreEOS := fs.Bool("ignore-eos", false, "keep generating after EOS")
	logprobs := fs.Int("logprobs", -1, "return the top-N logprobs of each generated token")
	promptLogprobs := fs.Bool("prompt-logprobs", false, "return the logprob of every prompt token")
	keepSpecial := fs.Bool("keep-special", false, "keep special tokens in the text")
	requestID := fs.String("request-id", "", "client-chosen request id")
	asJSON := fs.Bool("json", false, "print one JSON object instead of streaming text")
	timeout := fs.Duration("timeout", 10*time.Minute, "give up after this long")
	if err := parse(fs, args); err != nil {
		return err
	}
	req := &pb.GenerateRequest{RequestId: *requestID, IgnoreEos: *ignoreEOS, PromptLogprobs: *promptLogprobs, Stop: stops}
	n := 0
	for _, s := range []string{*prompt, *chat, *ids} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		return usagef("give exactly one of --prompt, --chat, --ids")
	}
	switch {
	case *prompt != "":
		req.Input = &pb.GenerateRequest_Text{Text: *prompt}
	case *chat != "":
		msgs := []*pb.ChatMessage{}
		if *system != "" {
			msgs = append(msgs, &pb.ChatMessage{Role: "system", Content: *system})
		}
		msgs = append(msgs, &pb.ChatMessage{Role: "user", Content: *chat})
		req.Input = &pb.GenerateRequest_Chat{Chat: &pb.ChatInput{Messages: msgs}}
	default:
		v, err := parseIDs("ids", *ids)
		if err != nil {
			return err
		}
		req.Input = &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: v}}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	f32 := func(v float64) *float32 { x := float32(v); return &x }
	if set["max-tokens"] {
		req.MaxTokens = clamp32(*maxTokens)
	}
	if set["min-tokens"] {
		req.MinTokens = clamp32(*minTokens)
	}
	if set["temperature"] {
		req.Temperature = f32(*temperature)
	}
	if set["top-p"] {
		req.TopP = f32(*topP)
	}
	if set["top-k"] {
		req.TopK = clamp32(*topK)
	}
	if set["min-p"] {
		req.MinP = f32(*minP)
	}
	if set["repetition-penalty"] {
		req.RepetitionPenalty = f32(*repPen)
	}
	if set["presence-penalty"] {
		req.PresencePenalty = f32(*presPen)
	}
	if set["frequency-penalty"] {
		req.FrequencyPenalty = f32(*freqPen)
	}
	if set["seed"] {
		req.Seed = seed
	}
	if set["logprobs"] {
		req.Logprobs = clamp32(*logprobs)
	}
	if *keepSpecial {
		f := false
		req.SkipSpecialTokens = &f
	}
	if *stopIDs != "" {
		v, err := parseIDs("stop-token-ids", *stopIDs)
		if err != nil {
			return err
		}
		req.StopTokenIds = v
	}
	c, err := cf.connect()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()
	res, err := c.Generate(ctx, req, func(ch *pb.GenerateChunk) error {
		if !*asJSON {
			fmt.Print(ch.Text)
		}
		return nil
	})
	if err != nil {
		return rpcError(err)
	}
	out := generateJSON{ID: res.RequestID, IDs: res.TokenIDs, Text: res.Text}
	for _, lp := range res.Logprobs {
		l := lpJSON{ID: lp.TokenId, Logprob: lp.Logprob}
		for _, t := range lp.Top {
			l.Top = append(l.Top, topLpJSON{ID: t.TokenId, Token: t.Token, Logprob: t.Logprob})
		}
		out.Logprobs = append(out.Logprobs, l)
	}
	cm := res.Complete
	out.FinishReason, out.MatchedStop, out.Usage, out.Preemptions = cm.FinishReason, cm.MatchedStop, res.Usage, cm.Preemptions
	for _, p := range cm.PromptLogprobs {
		if p.Logprob == nil {
			out.PromptLogprobs = append(out.PromptLogprobs, nil)
		} else {
			v := float64(*p.Logprob)
			out.PromptLogprobs = append(out.PromptLogprobs, &v)
		}
	}
	if out.IDs == nil {
		out.IDs = []int32{}
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		return enc.Encode(out)
	}
	fmt.Printf("\n[%s: %d prompt + %d generated tokens]\n", out.FinishReason, out.Usage.GetPromptTokens(), out.Usage.GetCompletionTokens())
	return nil
}

func runStatus(args []string) error {
	fs := newFlags("status", "--addr HOST:PORT[,HOST:PORT...] [--tls-dir DIR] [--api-key KEY | --api-key-file FILE] [--json] [--wait 60s]")
	addr := fs.String("addr", "127.0.0.1:50051", "coordinator addresses, comma separated: the first that answers is asked")
	asJSON := fs.Bool("json", false, "print the server info as JSON")
	wait := fs.Duration("wait", 0, "wait up to this long until the cluster can serve")
	sf := addSecurityFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *wait < 0 {
		return usagef("--wait: must be >= 0")
	}
	addrs, err := parseList("addr", *addr)
	if err != nil {
		return err
	}
	if len(addrs) == 0 {
		return usagef("--addr HOST:PORT is required")
	}
	tlsCfg, key, err := sf.config()
	if err != nil {
		return err
	}
	c, err := client.New(client.Config{Addrs: addrs, TLS: tlsCfg, APIKey: key})
	if err != nil {
		return err
	}
	defer c.Close()
	deadline := time.Now().Add(*wait)
	var info *pb.ServerInfo
	var health *pb.HealthCheckResponse
	for {
		var stub pb.GeneratorClient
		for _, a := range addrs { // the first that answers
			if stub, err = c.Stub(a); err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				info, err = stub.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
				cancel()
				if err == nil {
					break
				}
			}
		}
		health = nil
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err == nil && info.Ready {
			health, err = stub.HealthCheck(ctx, &pb.HealthCheckRequest{})
			if err == nil && !health.Healthy {
				info.Ready, info.NotReadyReason = false, "health check: "+health.Message
			}
		}
		cancel()
		if err == nil && info.Ready {
			break
		}
		if time.Now().After(deadline) {
			if err != nil {
				return rpcError(err)
			}
			if *wait > 0 {
				return fmt.Errorf("not ready after %v: %s", *wait, info.NotReadyReason)
			}
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if info.Security == "insecure" {
		fmt.Fprintln(os.Stderr, "warning: this cluster's public API is insecure: no TLS on a non-loopback address, so anyone on its network can read the requests and send their own (the coordinator's --tls-dir secures it)")
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(struct {
			*pb.ServerInfo
			Health *pb.HealthCheckResponse `json:"health,omitempty"`
		}{info, health}); err != nil {
			return err
		}
		if !info.Ready {
			return errors.New("cluster not ready")
		}
		return nil
	}
	state := "ready"
	if !info.Ready {
		state = "not ready: " + info.NotReadyReason
	}
	fmt.Printf("coordinator %s (leader %v, leader at %s), %s\n", info.CoordinatorId, info.Leader, info.LeaderAddress, state)
	fmt.Printf("workers:\n")
	for _, w := range info.Workers {
		if w.Address == "" && w.Pid == 0 { // the redacted view of a user API key
			fmt.Printf("  %-24s %s\n", w.Id, w.State)
			continue
		}
		metrics := ""
		if w.MetricsAddress != "" {
			metrics = "  metrics http://" + w.MetricsAddress + "/metrics"
		}
		fmt.Printf("  %-24s %-22s pid %-7d %s%s\n", w.Id, w.Address, w.Pid, w.State, metrics)
	}
	if p := info.Placement; p != nil {
		fmt.Printf("placement v%d of %s:\n", p.Version, p.Model)
		for _, r := range p.Replicas {
			ep := ""
			if r.Ep > 1 {
				ep = fmt.Sprintf(" ep=%d", r.Ep)
			}
			fmt.Printf("  replica %d: tp=%d pp=%d%s, workers %s\n", r.Index, max(r.Tp, 1), max(r.Pp, 1), ep, strings.Join(r.Workers, ","))
			for _, st := range r.Stages {
				fmt.Printf("    stage %d: layers [%d, %d) on %s\n", st.Index, st.LayersBegin, st.LayersEnd, strings.Join(st.Workers, ","))
			}
		}
	}
	if s := info.Scheduler; s != nil {
		fmt.Printf("scheduler: %d running, %d waiting, KV %d/%d blocks free (of %d tokens), %d preemptions, %d steps, %d tokens generated\n",
			s.Running, s.Waiting, s.KvBlocksFree, s.KvBlocksTotal, s.KvBlockSize, s.Preemptions, s.Steps, s.GeneratedTokens)
	}
	if health != nil {
		fmt.Printf("health: %v, %s (%.1f ms)\n", health.Healthy, health.Message, health.LatencyMs)
	}
	if !info.Ready {
		return errors.New("cluster not ready")
	}
	return nil
}
