// Command qwenctl is the client and operator CLI of qwenfleet.
//
//	qwenctl mkmodel --preset NAME --out DIR [--seed N] [--dtype bf16|f16|f32] [--layers N] [--config-only] [--if-missing]
//	qwenctl forward --model DIR --ids 1,2,3 [--out FILE.safetensors] [--generate N] [--compute f32|bf16] [--quantize q8|q8a]
//	qwenctl forward --model DIR --random-prompt N [--seed S] [--chunk 512] [--json FILE]
//	qwenctl demo    [--preset tiny] [--tokens N]
//	qwenctl tokenize (--model DIR | --tokenizer FILE) (--jsonl | --text TEXT [--chat])
//	qwenctl detokenize (--model DIR | --tokenizer FILE) --ids 1,2,3 [--skip-special] [--json]
//	qwenctl generate --addr HOST:PORT[,HOST:PORT...] [--etcd-endpoints URLS] (--prompt TEXT | --chat TEXT | --ids 1,2,3) [--max-tokens N] [--temperature T] [--json] ...
//	qwenctl status --addr HOST:PORT[,HOST:PORT...] [--json] [--wait 60s]
//	qwenctl drain  [--addr HOST:PORT] [--timeout D] [--force] [--no-wait] WORKER_ID
//	qwenctl experts --addr HOST:PORT [--rebalance [--redundant N]] [--json]
//	qwenctl bench  --addr HOST:PORT[,HOST:PORT...] [--etcd-endpoints URLS] [--concurrency C | --rate R] [--requests N | --duration D] [--dataset FILE.jsonl | [--shared-prefix N:L] --input-len DIST] [--output-len DIST] [--slo ...] [--json FILE] [--plot FILE.png]
//	qwenctl bench  --compare A.json B.json
//	qwenctl certs --out DIR [--hosts H1,H2,...] [--force] [--if-missing]
//	qwenctl apikey --file FILE --name N --role user|admin
//	qwenctl plan (--model DIR | --preset NAME) --workers N --mem 80GiB [--hosts H] [--backend cuda|cpu] [--tp N] [--pp M] [--kv-tokens N] [--json]
//	qwenctl peak  [--threads N] [--json]
//
// generate, status and bench take a list of coordinators: generate and
// bench send to the leader among them through pkg/client, which resumes a
// request whose stream broke (a leader that died) on the next leader.
//
// Every command that talks to a coordinator (generate, status, bench,
// drain, experts) takes --tls-dir DIR, to connect with TLS and verify the
// coordinator against DIR/ca.pem (the cluster CA that qwenctl certs
// writes; no client certificate is needed), and --api-key KEY or
// --api-key-file FILE (the key read from a file, white space around it
// ignored; default: $QWENFLEET_API_KEY; the file and the variable keep the
// key out of the process list), sent as "authorization: Bearer KEY" to
// coordinators that have --api-keys. A user key generates and reads a
// redacted status; drain and experts need an admin key.
//
// bench prints its report (and writes --json and --plot) whatever
// happened, then exits 1 when any request failed or the run was
// interrupted: a script or a container's exit status tells a clean run.
//
// mkmodel --if-missing and certs --if-missing make the one-shot jobs of a
// deployment (an init container, a compose service) safe to run again: they
// exit 0 without writing when --out already holds a model (a config.json:
// mkmodel moves it in last) or every certificate file.
//
// Every command prints one error line and exits non-zero on bad flags or
// input (2 for a usage error).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

type command struct {
	name, summary string
	run           func(args []string) error
}

var commands = []command{
	{"mkmodel", "write a random-weight checkpoint of a preset shape", runMkmodel},
	{"forward", "run token ids through a model: logits to a file, or greedy decoding", runForward},
	{"demo", "make (once) and run a small model end to end", runDemo},
	{"tokenize", "text to token ids (one string, or JSON lines on stdin)", runTokenize},
	{"detokenize", "token ids to text", runDetokenize},
	{"generate", "stream a completion from a cluster", runGenerate},
	{"status", "a cluster's workers, placement and health", runStatus},
	{"drain", "take a worker out gracefully: its requests finish or move, then it leaves", runDrain},
	{"bench", "load-test a cluster: throughput, TTFT, TPOT, ITL, latency (like vllm bench serve)", runBench},
	{"plan", "plan replicas, pipeline stages and TP ranks for a model on N workers", runPlan},
	{"certs", "write a cluster CA, certificates by role (coordinator, worker, client) and a gossip key", runCerts},
	{"apikey", "add an API key to a keys file; prints the new key, once", runAPIKey},
	{"experts", "expert load per rank of a MoE cluster's expert-parallel replicas; --rebalance re-places the experts", runExperts},
	{"peak", "this machine's CPU peak: FMA, bf16 and int8 dot throughput, memory read bandwidth", runPeak},
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: qwenctl COMMAND [flags]   (qwenctl COMMAND -h for its flags)")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
}

func main() {
	if len(os.Args) < 2 {
		usage(os.Stderr)
		os.Exit(2)
	}
	name := os.Args[1]
	if name == "-h" || name == "--help" || name == "help" {
		usage(os.Stdout)
		return
	}
	for _, c := range commands {
		if c.name != name {
			continue
		}
		err := c.run(os.Args[2:])
		switch {
		case err == nil:
			return
		case errors.Is(err, flag.ErrHelp):
			return
		case errors.As(err, new(usageError)):
			fmt.Fprintf(os.Stderr, "qwenctl %s: %v (see qwenctl %s -h)\n", name, err, name)
			os.Exit(2)
		default:
			fmt.Fprintf(os.Stderr, "qwenctl %s: %v\n", name, err)
			os.Exit(1)
		}
	}
	fmt.Fprintf(os.Stderr, "qwenctl: unknown command %q (see qwenctl -h)\n", name)
	os.Exit(2)
}

// usageError is a bad flag or argument.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// newFlags makes a flag set that reports parse errors as one line (through
// parse) and prints help to stdout on -h.
func newFlags(name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		fmt.Fprintf(os.Stdout, "usage: qwenctl %s %s\n", name, synopsis)
		fs.SetOutput(os.Stdout)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err // Parse has printed the usage
		}
		return usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

// parseIDs parses "1,2,3".
func parseIDs(flagName, s string) ([]int32, error) {
	if strings.TrimSpace(s) == "" {
		return nil, usagef("--%s: no token ids", flagName)
	}
	var ids []int32
	for _, f := range strings.Split(s, ",") {
		v, err := strconv.ParseInt(strings.TrimSpace(f), 10, 32)
		if err != nil || v < 0 {
			return nil, usagef("--%s: %q is not a token id", flagName, f)
		}
		ids = append(ids, int32(v))
	}
	return ids, nil
}
