package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/bench"
	"github.com/qwenfleet/qwenfleet/pkg/client"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

const benchSynopsis = "[--addr HOST:PORT[,HOST:PORT...] | --http [--http-addr HOST:PORT]] [--etcd-endpoints URLS] [--tls-dir DIR] [--api-key KEY | --api-key-file FILE] [--concurrency C] [--rate R] [--requests N] [--duration D] " +
	"[--dataset FILE.jsonl | [--shared-prefix N:L] --input-len DIST] [--output-len DIST] [--slo ttft=200ms,tpot=50ms,e2e=2s] [--json FILE] [--plot FILE.png] ...\n" +
	"Prints the report (and writes --json and --plot) however the run went; exits 0 when every request completed, 1 when any failed or the run was interrupted, 2 on bad flags.\n" +
	"   or: qwenctl bench --compare A.json B.json\n" +
	"Compares two runs' --json reports request by request (the same --seed, greedy: their output_token_ids should agree); exits 0 when they are identical, 1 when not."

// runBench is a load generator modelled on `vllm bench serve`: it sends
// requests closed loop (C in flight) or open loop (Poisson arrivals, capped
// at C in flight when both are given), records every chunk's arrival, and
// prints (and writes) a bench.Report. The prompts, arrivals and statistics
// are pkg/bench's; this is the gRPC and timer loop around them. Once the
// report is out, a run in which any request failed or that was interrupted
// returns an error (exit 1) saying how many and why.
func runBench(args []string) error {
	fs := newFlags("bench", benchSynopsis)
	cf := addClusterFlags(fs)
	addr := cf.addr
	concurrency := fs.Int("concurrency", 1, "requests kept in flight (closed loop); with --rate, a cap on requests in flight (none unless given)")
	rate := fs.Float64("rate", 0, "open loop: Poisson arrivals at this many requests/s (inf: all at once)")
	requests := fs.Int("requests", 100, "requests to send (no limit when only --duration is given)")
	duration := fs.Duration("duration", 0, "stop sending after this long, then wait for the requests in flight")
	dataset := fs.String("dataset", "", `JSONL prompts: {"prompt": ...} or {"messages": [...]}, with optional "max_tokens"; cycled`)
	inputLen := fs.String("input-len", "128", "synthetic prompt length in tokens: N, uniform:A-B or normal:MEAN,STD (with --shared-prefix: the user turn's, default 32)")
	sharedPrefix := fs.String("shared-prefix", "", "shared-prefix workload N:L: N synthetic system prompts of L tokens; each request is one of them (drawn from --seed) then a user turn of --input-len tokens; the report adds TTFT on a prefix's first use and on reuse")
	outputLen := fs.String("output-len", "128", "tokens to generate when a prompt names no max_tokens: N, uniform:A-B or normal:MEAN,STD")
	temperature := fs.Float64("temperature", 0, "sampling temperature (0: greedy)")
	ignoreEOS := fs.Bool("ignore-eos", false, "keep generating after EOS, so outputs are exactly max_tokens long (default: true for synthetic prompts, false with --dataset)")
	seed := fs.Int64("seed", 0, "seed of the prompts, lengths and arrivals")
	sloFlag := fs.String("slo", "", "goodput objectives, any of ttft=200ms,tpot=50ms,e2e=2s")
	jsonOut := fs.String("json", "", "write the report, config and per-request records (with their output_token_ids, and prefix_index with --shared-prefix) as JSON to this file")
	plotOut := fs.String("plot", "", "draw latency over time and TTFT/ITL histograms to this PNG file")
	quiet := fs.Bool("quiet", false, "no progress bar")
	httpMode := fs.Bool("http", false, "drive the coordinator's OpenAI-compatible HTTP API (--http-addr; https with --tls-dir) instead of gRPC: the same prompts, streamed, and the same report")
	httpAddr := fs.String("http-addr", "127.0.0.1:8000", "with --http: the coordinator's --http-listen address")
	compare := fs.String("compare", "", "compare the output_token_ids of the --json reports `A.json` and B.json (the argument after it) request by request instead of running (two runs of the same --seed, greedy, should agree); exit 0 when identical, 1 when not")
	// As parse, but --compare takes a second file after it.
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err // Parse has printed the usage
		}
		return usageError{err.Error()}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["compare"] {
		return compareBench(*compare, fs.Args(), len(set))
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}

	cfg := bench.Config{Addr: *addr, API: "grpc", Dataset: *dataset, Temperature: *temperature, Seed: *seed}
	if set["http-addr"] && !*httpMode {
		return usagef("--http-addr: only with --http")
	}
	if *httpMode && (set["addr"] || set["etcd-endpoints"]) {
		return usagef("--http: drives --http-addr; --addr and --etcd-endpoints are gRPC's")
	}
	switch {
	case set["concurrency"] && *concurrency < 1:
		return usagef("--concurrency: must be >= 1")
	case set["concurrency"] || !set["rate"]:
		cfg.Concurrency = *concurrency
	}
	if set["rate"] {
		if !(*rate > 0) {
			return usagef("--rate: must be > 0 (or inf)")
		}
		cfg.Rate = bench.Rate(*rate)
	}
	if set["requests"] && *requests < 1 {
		return usagef("--requests: must be >= 1")
	}
	if set["duration"] && *duration <= 0 {
		return usagef("--duration: must be > 0")
	}
	if set["requests"] || !set["duration"] {
		cfg.Requests = *requests
	}
	cfg.DurationS = duration.Seconds()
	if math.IsInf(*rate, 1) && cfg.Requests == 0 && cfg.Concurrency == 0 {
		return usagef("--rate inf with only --duration would never stop sending: give --requests or --concurrency")
	}
	out, err := bench.ParseLengthDist(*outputLen)
	if err != nil {
		return usagef("--output-len: %v", err)
	}
	cfg.OutputLen = out
	if *dataset != "" && set["input-len"] {
		return usagef("--input-len: not used with --dataset (the dataset holds the prompts)")
	}
	if set["shared-prefix"] {
		if *dataset != "" {
			return usagef("--shared-prefix: not with --dataset (the dataset holds the prompts; the shared prefixes are synthetic)")
		}
		sp, err := bench.ParseSharedPrefix(*sharedPrefix)
		if err != nil {
			return usagef("--shared-prefix: %v", err)
		}
		cfg.SharedPrefix = &sp
		if !set["input-len"] {
			*inputLen = "32" // a short user turn after the long shared prefix
		}
	}
	if *dataset == "" {
		in, err := bench.ParseLengthDist(*inputLen)
		if err != nil {
			return usagef("--input-len: %v", err)
		}
		cfg.InputLen = &in
	}
	cfg.IgnoreEOS = *dataset == ""
	if set["ignore-eos"] {
		cfg.IgnoreEOS = *ignoreEOS
	}
	if !(*temperature >= 0) {
		return usagef("--temperature: must be >= 0")
	}
	var slo *bench.SLO
	if set["slo"] {
		s, err := bench.ParseSLO(*sloFlag)
		if err != nil {
			return usagef("--slo: %v", err)
		}
		slo = &s
	}
	var prompts []bench.Prompt
	if *dataset != "" {
		f, err := os.Open(*dataset)
		if err != nil {
			return fmt.Errorf("--dataset: %w", err)
		}
		prompts, err = bench.ReadJSONL(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("--dataset %s: %w", *dataset, err)
		}
	}
	// Open the outputs now, so a bad path fails before a long run.
	// Until the report is written, they are removed again on the way out.
	outputs := map[string]*os.File{}
	written := false
	defer func() {
		for _, f := range outputs {
			f.Close()
			if !written {
				os.Remove(f.Name())
			}
		}
	}()
	for _, o := range []struct{ flag, path string }{{"json", *jsonOut}, {"plot", *plotOut}} {
		if o.path == "" {
			continue
		}
		f, err := os.Create(o.path)
		if err != nil {
			return fmt.Errorf("--%s: %w", o.flag, err)
		}
		outputs[o.flag] = f
	}

	var c *client.Client
	var hb *httpBench
	var info *pb.ModelInfo
	ictx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if *httpMode {
		tlsCfg, key, err := cf.sec.config()
		if err != nil {
			cancel()
			return err
		}
		hb = newHTTPBench(*httpAddr, tlsCfg, key, max(cfg.Concurrency, 64))
		cfg.Addr, cfg.API = hb.base, "http"
		if info, err = hb.modelInfo(ictx); err != nil {
			cancel()
			return fmt.Errorf("cannot reach the coordinator's HTTP API at %s: %w", hb.base, err)
		}
	} else {
		if c, err = cf.connect(); err != nil {
			cancel()
			return err
		}
		defer c.Close()
		if info, err = c.ModelInfo(ictx); err != nil {
			cancel()
			return fmt.Errorf("cannot reach the coordinator at %s: %w", *addr, rpcError(err))
		}
	}
	cancel()
	cfg.Model = info.Name
	var src bench.Source
	if prompts != nil {
		for i, p := range prompts {
			if p.TokenIDs == nil && !info.HasTokenizer {
				return fmt.Errorf("--dataset %s: prompt %d is text, and the served model has no tokenizer", *dataset, i+1)
			}
		}
		src = bench.Dataset{Prompts: prompts, Output: out, Seed: uint64(*seed)}
	} else {
		limit := bench.TokenLimit(int(info.VocabSize), info.EosTokenIds)
		if limit <= len(info.EosTokenIds) {
			return fmt.Errorf("the served model's vocabulary of %d has no ids for synthetic prompts", info.VocabSize)
		}
		syn := bench.Synthetic{Input: *cfg.InputLen, Output: out, Limit: limit, Avoid: info.EosTokenIds, Seed: uint64(*seed),
			MaxInput: int(info.MaxContext)}
		src = syn
		if sp := cfg.SharedPrefix; sp != nil {
			if src, err = bench.NewSharedPrefixes(*sp, syn); err != nil {
				return fmt.Errorf("--shared-prefix %s: %w", sp, err)
			}
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r := &benchRunner{client: c, http: hb, src: src, cfg: cfg, temperature: float32(*temperature), t0: time.Now()}
	var bar *progressBar
	if !*quiet && isTerminal(os.Stderr) {
		bar = startProgress(os.Stderr, r)
	}
	reqs := r.run(ctx)
	elapsed := time.Since(r.t0)
	bar.stop()
	interrupted := ctx.Err() != nil // before stop, which ends ctx too
	if interrupted {
		fmt.Fprintf(os.Stderr, "interrupted after %.1fs: reporting what finished\n", elapsed.Seconds())
	}
	stop()

	rep := bench.Summarize(cfg, reqs, elapsed, slo)
	if err := rep.WriteText(os.Stdout); err != nil {
		return err
	}
	if f := outputs["json"]; f != nil {
		enc := json.NewEncoder(f)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return fmt.Errorf("--json: %w", err)
		}
	}
	if f := outputs["plot"]; f != nil {
		if err := bench.WritePNG(f, rep); err != nil {
			return fmt.Errorf("--plot: %w", err)
		}
	}
	for name, f := range outputs {
		if err := f.Close(); err != nil {
			return fmt.Errorf("--%s: %w", name, err)
		}
	}
	written = true
	return benchOutcome(rep, interrupted)
}

// compareBench is `qwenctl bench --compare A.json B.json`: it prints how
// the two reports' outputs compare (bench.Compare) and returns an error
// saying how they differ unless they are identical. nflags counts the flags
// given, --compare included: it takes no other.
func compareBench(a string, rest []string, nflags int) error {
	if len(rest) != 1 {
		return usagef("--compare: wants two --json reports: --compare A.json B.json")
	}
	if nflags > 1 {
		return usagef("--compare: compares two reports and runs nothing: no other flags")
	}
	var reps [2]*bench.Report
	for i, path := range []string{a, rest[0]} {
		raw, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("--compare: %w", err)
		}
		reps[i] = new(bench.Report)
		if err := json.Unmarshal(raw, reps[i]); err != nil {
			return fmt.Errorf("--compare: %s is not a qwenctl bench --json report: %v", path, err)
		}
	}
	c := bench.Compare(reps[0], reps[1])
	if err := c.WriteText(os.Stdout); err != nil {
		return err
	}
	if c.Identical() {
		return nil
	}
	var why []string
	if len(c.ConfigDiffs) > 0 {
		why = append(why, "the runs' configs differ ("+strings.Join(c.ConfigDiffs, ", ")+")")
	}
	if n := len(c.Diffs); n > 0 {
		why = append(why, fmt.Sprintf("%d of %d %s differ", n, c.Compared, plural(c.Compared, "output")))
	}
	if n := len(c.NotCompared); n > 0 {
		why = append(why, fmt.Sprintf("%d %s not completed in both runs", n, plural(n, "request")))
	}
	if n := len(c.NoIDs); n > 0 {
		why = append(why, fmt.Sprintf("%d %s without output_token_ids", n, plural(n, "request")))
	}
	if len(why) == 0 {
		why = append(why, "no request to compare")
	}
	return fmt.Errorf("%s and %s are not identical: %s", a, rest[0], strings.Join(why, "; "))
}

// benchOutcome is the run's error once its report is out: nil when every
// request sent completed.
func benchOutcome(rep *bench.Report, interrupted bool) error {
	var why []string
	if rep.Failed > 0 {
		var codes []string
		for _, code := range slices.Sorted(maps.Keys(rep.Failures)) {
			codes = append(codes, fmt.Sprintf("%s %d", code, rep.Failures[code]))
		}
		why = append(why, fmt.Sprintf("%d of %d %s failed (%s)", rep.Failed, len(rep.Records), plural(len(rep.Records), "request"), strings.Join(codes, ", ")))
	}
	if interrupted || rep.Interrupted > 0 {
		why = append(why, fmt.Sprintf("interrupted with %d %s in flight", rep.Interrupted, plural(rep.Interrupted, "request")))
	}
	if len(why) == 0 {
		return nil
	}
	return errors.New(strings.Join(why, "; "))
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}

// benchRunner sends the requests of one run.
type benchRunner struct {
	client      *client.Client
	http        *httpBench // --http: the OpenAI-compatible API instead of client
	src         bench.Source
	cfg         bench.Config
	temperature float32
	t0          time.Time

	sent, done, failed atomic.Int64 // for the progress bar

	mu   sync.Mutex
	reqs []bench.Request
}

// run sends requests until cfg.Requests were sent, cfg.DurationS passed or
// ctx ends; it returns once every request sent has ended. Ending ctx (Ctrl-C)
// also cancels the requests in flight, which are recorded as interrupted.
func (r *benchRunner) run(ctx context.Context) []bench.Request {
	limit := time.Duration(r.cfg.DurationS * float64(time.Second))
	var wg sync.WaitGroup
	if r.cfg.Rate == 0 {
		// Closed loop: Concurrency senders, each sending its next request
		// as soon as its last one ended.
		var next atomic.Int64
		for range r.cfg.Concurrency {
			wg.Go(func() {
				for ctx.Err() == nil && (limit == 0 || time.Since(r.t0) < limit) {
					i := int(next.Add(1) - 1)
					if r.cfg.Requests > 0 && i >= r.cfg.Requests {
						return
					}
					r.one(ctx, i)
				}
			})
		}
		wg.Wait()
		return r.reqs
	}
	// Open loop: request i arrives at the sum of i Poisson gaps from the
	// start (request 0 at once) and is sent then, or when one of the
	// Concurrency slots frees up if it is capped (vLLM's --max-concurrency).
	gaps := bench.NewPoisson(float64(r.cfg.Rate), uint64(r.cfg.Seed))
	var slots chan struct{}
	if r.cfg.Concurrency > 0 {
		slots = make(chan struct{}, r.cfg.Concurrency)
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	var at time.Duration
loop:
	for i := 0; r.cfg.Requests == 0 || i < r.cfg.Requests; i++ {
		if i > 0 {
			at += gaps.Next()
		}
		if limit > 0 && at >= limit {
			break
		}
		if wait := time.Until(r.t0.Add(at)); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-ctx.Done():
				break loop
			}
		}
		if slots != nil {
			var deadline <-chan time.Time // a capped send still ends with --duration
			if limit > 0 {
				timer.Reset(max(time.Until(r.t0.Add(limit)), 0))
				deadline = timer.C
			}
			select {
			case slots <- struct{}{}:
			case <-deadline:
				break loop
			case <-ctx.Done():
				break loop
			}
			if !timer.Stop() && deadline != nil {
				select { // drain a fire that raced the slot
				case <-timer.C:
				default:
				}
			}
		}
		if ctx.Err() != nil || (limit > 0 && time.Since(r.t0) >= limit) {
			if slots != nil {
				<-slots
			}
			break
		}
		wg.Go(func() {
			r.one(ctx, i)
			if slots != nil {
				<-slots
			}
		})
	}
	wg.Wait()
	return r.reqs
}

// one sends request i and records what came back. Failures (those the
// client library gave up on: it resumes a request whose stream broke) are
// recorded by gRPC status code and never stop the run.
func (r *benchRunner) one(ctx context.Context, i int) {
	p := r.src.Prompt(i)
	if r.http != nil {
		r.sent.Add(1)
		rec := bench.Request{Index: i, Start: time.Since(r.t0), PromptTokens: len(p.TokenIDs), Prefix: p.Prefix}
		r.finish(ctx, r.http.stream(ctx, p, r.temperature, r.cfg.IgnoreEOS, r.t0, &rec), &rec)
		return
	}
	req := &pb.GenerateRequest{Temperature: &r.temperature, MaxTokens: clamp32(p.MaxTokens), IgnoreEos: r.cfg.IgnoreEOS,
		RequestId: fmt.Sprintf("bench-%d-%d", r.t0.UnixNano(), i)} // findable in the coordinator's log
	switch {
	case p.TokenIDs != nil:
		req.Input = &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: p.TokenIDs}}
	case p.Messages != nil:
		msgs := make([]*pb.ChatMessage, len(p.Messages))
		for j, m := range p.Messages {
			msgs[j] = &pb.ChatMessage{Role: m.Role, Content: m.Content}
		}
		req.Input = &pb.GenerateRequest_Chat{Chat: &pb.ChatInput{Messages: msgs}}
	default:
		req.Input = &pb.GenerateRequest_Text{Text: p.Text}
	}
	r.sent.Add(1)
	rec := bench.Request{Index: i, ID: req.RequestId, Start: time.Since(r.t0), PromptTokens: len(p.TokenIDs), Prefix: p.Prefix}
	r.finish(ctx, r.stream(ctx, req, &rec), &rec)
}

// stream runs the request into rec; it returns the status code name of a
// failure, or "" once the complete message arrived.
func (r *benchRunner) stream(ctx context.Context, req *pb.GenerateRequest, rec *bench.Request) string {
	streamed := 0
	res, err := r.client.Generate(ctx, req, func(ch *pb.GenerateChunk) error {
		now := time.Since(r.t0)
		rec.End = now
		if n := len(ch.TokenIds); n > 0 {
			rec.Chunks = append(rec.Chunks, bench.Chunk{At: now, Tokens: n})
			streamed += n
		}
		return nil
	})
	rec.End = time.Since(r.t0)
	rec.OutputIDs = res.TokenIDs // each once, also across resumes
	if err != nil {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return status.FromContextError(err).Code().String()
		}
		return status.Code(err).String()
	}
	rec.OutputTokens = streamed
	if u := res.Complete.Usage; u != nil {
		rec.PromptTokens, rec.OutputTokens = int(u.PromptTokens), int(u.CompletionTokens)
	}
	return ""
}

func (r *benchRunner) finish(ctx context.Context, code string, rec *bench.Request) {
	rec.Code = code
	switch {
	case code == "":
		r.done.Add(1)
	case ctx.Err() != nil:
		rec.Interrupted = true
	default:
		r.failed.Add(1)
	}
	r.mu.Lock()
	r.reqs = append(r.reqs, *rec)
	r.mu.Unlock()
}

// isTerminal reports whether f is a character device (a terminal, when it
// is stderr).
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// progressBar redraws one status line on a terminal every 200 ms until
// stop.
type progressBar struct {
	w    io.Writer
	r    *benchRunner
	quit chan struct{}
	wg   sync.WaitGroup
}

func startProgress(w io.Writer, r *benchRunner) *progressBar {
	p := &progressBar{w: w, r: r, quit: make(chan struct{})}
	p.wg.Go(func() {
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-p.quit:
				fmt.Fprintf(p.w, "\r\033[K%s\n", p.line())
				return
			case <-t.C:
				fmt.Fprintf(p.w, "\r\033[K%s", p.line())
			}
		}
	})
	return p
}

// stop draws the last line and waits for the drawing goroutine; a nil bar
// does nothing.
func (p *progressBar) stop() {
	if p == nil {
		return
	}
	close(p.quit)
	p.wg.Wait()
}

func (p *progressBar) line() string {
	cfg := p.r.cfg
	el := time.Since(p.r.t0)
	done, failed, sent := p.r.done.Load(), p.r.failed.Load(), p.r.sent.Load()
	frac, total := 0.0, "?"
	if cfg.Requests > 0 {
		frac, total = float64(done+failed)/float64(cfg.Requests), fmt.Sprint(cfg.Requests)
	}
	if cfg.DurationS > 0 {
		frac = max(frac, min(1, el.Seconds()/cfg.DurationS))
	}
	const width = 30
	n := int(frac * width)
	return fmt.Sprintf("[%s%s] %d/%s done, %d failed, %d in flight  %.1fs  %.2f req/s",
		strings.Repeat("#", n), strings.Repeat(".", width-n), done, total, failed, sent-done-failed,
		el.Seconds(), float64(done)/max(el.Seconds(), 1e-9))
}
