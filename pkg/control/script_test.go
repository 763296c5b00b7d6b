package control

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/units"
)

// The scripts in testdata/ drive a Machine one event at a time. Each block
// is an optional run of "#" comment lines, one command, a "----" line and
// the expected output: the actions the event produced, one a line, then the
// machine's state ("state:" lines). Blocks are separated by a blank line.
//
// Commands (key=value arguments; values with spaces in double quotes):
//
//	config preset=NAME [tp= pp= ep= redundant= kv-tokens= batch-tokens= retry= max-retry= eplb=]
//	lead fence=N [last-gen=N]        LeadershipGained
//	lose-leadership                  LeadershipLost
//	worker-up id= [host= mem= pid= addr= gossip= backend=]   WorkerUp (and remembered)
//	restart id= pid=                 WorkerUp of the remembered worker with a new pid
//	worker-gone id=                  WorkerGone (and forgotten)
//	etcd-list                        Workers with every remembered worker
//	unlist id=                       Workers without it (its key went; it stays remembered)
//	confirm id= [alive]              WorkerConfirmed
//	renew fence=                     LeadershipRenewed
//	suspect id= [addr=] / alive id= [addr=]   GossipSuspect / GossipAlive
//	written seq=                     PlacementWritten
//	write-failed seq= [fenced] [err=]
//	loaded gen= [worker=]            Loaded (every member when no worker)
//	load-failed gen= worker= [err=]
//	warmed gen= blocks=              WarmedUp
//	warm-failed gen= [err=]
//	step-failed gen= [refused] [superseded] [unconfirmed] [err=]
//	health gen= [unhealthy=]         HealthChecked
//	drain worker= [timeout=] [force] [req=]   DrainRequested
//	worker-drains id= [timeout=]     WorkerUp of the remembered worker asking to be drained
//	idle gen=                        ReplicaIdle
//	rebalance req= [rebalance] [redundant=]   RebalanceRequested
//	counts gen= [base=] [hot=E:N,...] [err=]  ExpertCounts: every expert of every layer base, hot ones N
//	experts-loaded gen= v= [err=]    ExpertsLoaded
//	tick [DURATION]                  time passes (default 0), then Tick
//
// A failing script names its file, the command's line and the first line
// that differs. go test ./pkg/control -rewrite writes the actual outputs
// back: review the diff.
var rewrite = flag.Bool("rewrite", false, "rewrite the expected outputs of testdata/*.txt")

func TestScripts(t *testing.T) {
	files, err := filepath.Glob("testdata/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no scripts in testdata: %v", err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".txt"), func(t *testing.T) { runScript(t, f) })
	}
}

type block struct {
	comments []string
	cmd      string
	line     int // of cmd, 1-based
	want     []string
}

func parseScript(t *testing.T, path string) []block {
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var bs []block
	var cur *block
	inOut := false
	for i, l := range strings.Split(strings.TrimRight(string(raw), "\n"), "\n") {
		if cur == nil {
			if strings.TrimSpace(l) == "" {
				continue
			}
			bs = append(bs, block{})
			cur = &bs[len(bs)-1]
		}
		switch {
		case inOut && l == "":
			cur, inOut = nil, false
		case inOut:
			cur.want = append(cur.want, l)
		case strings.HasPrefix(l, "#"):
			cur.comments = append(cur.comments, l)
		case l == "----":
			inOut = true
		case cur.cmd != "":
			t.Fatalf("%s:%d: a second command in one block (missing ----?)", path, i+1)
		default:
			cur.cmd, cur.line = l, i+1
		}
	}
	for _, b := range bs {
		if b.cmd == "" {
			t.Fatalf("%s: a block with no command", path)
		}
	}
	return bs
}

func runScript(t *testing.T, path string) {
	bs := parseScript(t, path)
	d := &driver{t: t, now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), known: map[string]Worker{}, unlisted: map[string]bool{}}
	var out strings.Builder
	failed := false
	for _, b := range bs {
		got := d.run(b.cmd, fmt.Sprintf("%s:%d", path, b.line))
		for _, c := range b.comments {
			out.WriteString(c + "\n")
		}
		out.WriteString(b.cmd + "\n----\n")
		for _, g := range got {
			out.WriteString(g + "\n")
		}
		out.WriteString("\n")
		if !*rewrite && !failed {
			for i := 0; i < max(len(got), len(b.want)); i++ {
				g, w := "<nothing>", "<nothing>"
				if i < len(got) {
					g = got[i]
				}
				if i < len(b.want) {
					w = b.want[i]
				}
				if g != w {
					t.Errorf("%s:%d: %s\n  output line %d differs\n   got: %s\n  want: %s\n  (go test ./pkg/control -rewrite regenerates; review the diff)",
						path, b.line, b.cmd, i+1, g, w)
					failed = true
					break
				}
			}
		}
	}
	if *rewrite {
		if err := os.WriteFile(path, []byte(strings.TrimRight(out.String(), "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

type driver struct {
	t        *testing.T
	m        *Machine
	now      time.Time
	known    map[string]Worker
	unlisted map[string]bool // left out of etcd-list
	order    []string
}

type args map[string]string

func parseArgs(s string) (string, args, error) {
	var toks []string
	var cur strings.Builder
	quoted := false
	for _, r := range s {
		switch {
		case r == '"':
			quoted = !quoted
		case r == ' ' && !quoted:
			if cur.Len() > 0 {
				toks = append(toks, cur.String())
				cur.Reset()
			}
		default:
			cur.WriteRune(r)
		}
	}
	if quoted {
		return "", nil, fmt.Errorf("unterminated quote")
	}
	if cur.Len() > 0 {
		toks = append(toks, cur.String())
	}
	if len(toks) == 0 {
		return "", nil, fmt.Errorf("empty command")
	}
	a := args{}
	for _, tk := range toks[1:] {
		k, v, _ := strings.Cut(tk, "=")
		a[k] = v
	}
	return toks[0], a, nil
}

func (a args) has(k string) bool { _, ok := a[k]; return ok }

func (a args) str(k, def string) string {
	if v, ok := a[k]; ok {
		return v
	}
	return def
}

func (d *driver) fatalf(where, format string, args ...any) {
	d.t.Helper()
	d.t.Fatalf("%s: %s", where, fmt.Sprintf(format, args...))
}

func (a args) int(d *driver, where, k string, def int64) int64 {
	v, ok := a[k]
	if !ok {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		d.fatalf(where, "%s=%q: %v", k, v, err)
	}
	return n
}

func (a args) dur(d *driver, where, k string, def time.Duration) time.Duration {
	v, ok := a[k]
	if !ok {
		return def
	}
	x, err := time.ParseDuration(v)
	if err != nil {
		d.fatalf(where, "%s=%q: %v", k, v, err)
	}
	return x
}

func (d *driver) run(line, where string) []string {
	cmd, a, err := parseArgs(line)
	if err != nil {
		d.fatalf(where, "%v", err)
	}
	if cmd == "config" {
		return d.config(a, where)
	}
	if d.m == nil {
		d.fatalf(where, "the first command must be config")
	}
	gen := a.int(d, where, "gen", 0)
	var evs []Event
	switch cmd {
	case "lead":
		evs = append(evs, LeadershipGained{Fence: a.int(d, where, "fence", 1), LastGeneration: a.int(d, where, "last-gen", 0)})
	case "lose-leadership":
		evs = append(evs, LeadershipLost{})
	case "worker-up":
		id := a.str("id", "")
		if id == "" {
			d.fatalf(where, "worker-up needs id=")
		}
		mem := int64(0)
		if v := a.str("mem", ""); v != "" {
			if mem, err = units.ParseBytes(v); err != nil {
				d.fatalf(where, "mem=%q: %v", v, err)
			}
		}
		w := Worker{ID: id, Host: a.str("host", "h1"), MemoryBytes: mem, PID: int(a.int(d, where, "pid", 100)),
			Addr: a.str("addr", id+":7000"), GossipAddr: a.str("gossip", ""), Backend: a.str("backend", "cpu")}
		if _, ok := d.known[id]; !ok {
			d.order = append(d.order, id)
		}
		d.known[id] = w
		delete(d.unlisted, id)
		evs = append(evs, WorkerUp{Worker: w})
	case "restart":
		w, ok := d.known[a.str("id", "")]
		if !ok {
			d.fatalf(where, "restart of an unknown worker")
		}
		w.PID = int(a.int(d, where, "pid", int64(w.PID+1)))
		d.known[w.ID] = w
		evs = append(evs, WorkerUp{Worker: w})
	case "worker-gone":
		id := a.str("id", "")
		delete(d.known, id)
		evs = append(evs, WorkerGone{ID: id})
	case "etcd-list", "unlist":
		if cmd == "unlist" {
			d.unlisted[a.str("id", "")] = true
		}
		var ws []Worker
		for _, id := range d.order {
			if w, ok := d.known[id]; ok && !d.unlisted[id] {
				ws = append(ws, w)
			}
		}
		evs = append(evs, Workers{List: ws})
	case "confirm":
		evs = append(evs, WorkerConfirmed{ID: a.str("id", ""), Alive: a.has("alive")})
	case "renew":
		evs = append(evs, LeadershipRenewed{Fence: a.int(d, where, "fence", 0)})
	case "suspect":
		evs = append(evs, GossipSuspect{ID: a.str("id", ""), Addr: a.str("addr", "")})
	case "alive":
		evs = append(evs, GossipAlive{ID: a.str("id", ""), Addr: a.str("addr", "")})
	case "written":
		evs = append(evs, PlacementWritten{Seq: a.int(d, where, "seq", 0)})
	case "write-failed":
		evs = append(evs, PlacementWriteFailed{Seq: a.int(d, where, "seq", 0), Fenced: a.has("fenced"), Err: a.str("err", "etcd: deadline exceeded")})
	case "loaded":
		if w := a.str("worker", ""); w != "" {
			evs = append(evs, Loaded{Gen: gen, Worker: w})
			break
		}
		for _, id := range d.members(gen) {
			evs = append(evs, Loaded{Gen: gen, Worker: id})
		}
	case "load-failed":
		evs = append(evs, LoadFailed{Gen: gen, Worker: a.str("worker", ""), Err: a.str("err", "no such file")})
	case "warmed":
		evs = append(evs, WarmedUp{Gen: gen, Blocks: a.int(d, where, "blocks", 64)})
	case "warm-failed":
		evs = append(evs, WarmupFailed{Gen: gen, Err: a.str("err", "out of memory")})
	case "step-failed":
		evs = append(evs, StepFailed{Gen: gen, Refused: a.has("refused"), Superseded: a.has("superseded"), Unconfirmed: a.has("unconfirmed"), Err: a.str("err", "connection refused")})
	case "health":
		evs = append(evs, HealthChecked{Gen: gen, Unhealthy: a.str("unhealthy", "")})
	case "drain":
		evs = append(evs, DrainRequested{Worker: a.str("worker", ""), Timeout: a.dur(d, where, "timeout", time.Minute),
			Force: a.has("force"), Req: a.int(d, where, "req", 0)})
	case "worker-drains":
		w, ok := d.known[a.str("id", "")]
		if !ok {
			d.fatalf(where, "worker-drains of an unknown worker")
		}
		w.Draining, w.DrainTimeout = true, a.dur(d, where, "timeout", 0)
		d.known[w.ID] = w
		evs = append(evs, WorkerUp{Worker: w})
	case "idle":
		evs = append(evs, ReplicaIdle{Gen: gen})
	case "rebalance":
		evs = append(evs, RebalanceRequested{Req: a.int(d, where, "req", 1), Rebalance: a.has("rebalance"), Redundant: int(a.int(d, where, "redundant", -1))})
	case "counts":
		evs = append(evs, ExpertCounts{Gen: gen, Counts: d.counts(a, where), Err: a.str("err", "")})
	case "experts-loaded":
		n := len(d.members(gen))
		loaded := make([]int32, n)
		for i := range loaded {
			loaded[i] = 1
		}
		evs = append(evs, ExpertsLoaded{Gen: gen, Version: a.int(d, where, "v", 0), Loaded: loaded, Err: a.str("err", "")})
	case "tick":
		if len(a) > 1 {
			d.fatalf(where, "tick takes one duration")
		}
		for k := range a {
			x, err := time.ParseDuration(k)
			if err != nil {
				d.fatalf(where, "tick %q: %v", k, err)
			}
			d.now = d.now.Add(x)
		}
		evs = append(evs, Tick{})
	case "status":
		return d.state(true)
	default:
		d.fatalf(where, "unknown command %q", cmd)
	}
	var out []string
	for _, ev := range evs {
		for _, act := range d.m.Step(d.now, ev) {
			out = append(out, act.String())
		}
	}
	return append(out, d.state(false)...)
}

func (d *driver) config(a args, where string) []string {
	cfg, err := model.Preset(a.str("preset", "tiny"))
	if err != nil {
		d.fatalf(where, "%v", err)
	}
	c := Config{Model: cfg, ModelName: a.str("preset", "tiny"), ModelDir: "/models/" + a.str("preset", "tiny"),
		TP: int(a.int(d, where, "tp", 0)), PP: int(a.int(d, where, "pp", 0)), EP: int(a.int(d, where, "ep", 0)),
		RedundantExperts: int(a.int(d, where, "redundant", 0)), KVCacheTokens: int(a.int(d, where, "kv-tokens", 1024)),
		MaxBatchTokens: int(a.int(d, where, "batch-tokens", 512)), KVBytesPerValue: 4,
		RetryBackoff: a.dur(d, where, "retry", 0), MaxRetryBackoff: a.dur(d, where, "max-retry", 0), EPLBInterval: a.dur(d, where, "eplb", 0)}
	if d.m, err = New(c); err != nil {
		d.fatalf(where, "%v", err)
	}
	return []string{fmt.Sprintf("model %s: %d layers, %d experts", c.ModelName, cfg.NumHiddenLayers, cfg.NumExperts)}
}

func (d *driver) members(gen int64) []string {
	for _, r := range d.m.Status().Replicas {
		if r.Gen == gen {
			return r.Workers
		}
	}
	return nil
}

func (d *driver) counts(a args, where string) [][]int64 {
	L, E := d.m.cfg.Model.NumHiddenLayers, d.m.cfg.Model.NumExperts
	base := a.int(d, where, "base", 10)
	hot := map[int]int64{}
	if v := a.str("hot", ""); v != "" {
		for _, p := range strings.Split(v, ",") {
			e, n, ok := strings.Cut(p, ":")
			ei, err1 := strconv.Atoi(e)
			ni, err2 := strconv.ParseInt(n, 10, 64)
			if !ok || err1 != nil || err2 != nil {
				d.fatalf(where, "hot=%q: want EXPERT:COUNT,...", v)
			}
			hot[ei] = ni
		}
	}
	out := make([][]int64, L)
	for l := range out {
		out[l] = make([]int64, E)
		for e := range out[l] {
			out[l][e] = base
			if n, ok := hot[e]; ok {
				out[l][e] = n
			}
		}
	}
	return out
}

// state prints the replicas and the workers serving in none; full adds
// every worker and the whole reasons.
func (d *driver) state(full bool) []string {
	s := d.m.Status()
	lead := "follower"
	if s.Leader {
		lead = fmt.Sprintf("leader fence=%d", d.m.fence)
	}
	out := []string{fmt.Sprintf("state: %s written=%d/%d last-gen=%d", lead, d.m.written, d.m.seq, d.m.lastGen)}
	for _, r := range s.Replicas {
		var st []string
		for _, m := range r.Members {
			if len(st) <= m.Stage {
				st = append(st, m.Worker.ID)
			} else {
				st[m.Stage] += "," + m.Worker.ID
			}
		}
		line := fmt.Sprintf("  %s %s tp=%d pp=%d ep=%d [%s]", Key(r.Gen), r.State, r.TP, r.PP, r.EP, strings.Join(st, "|"))
		if r.Blocks > 0 {
			line += fmt.Sprintf(" blocks=%d", r.Blocks)
		}
		if r.EP > 1 {
			line += fmt.Sprintf(" experts=v%d", r.ExpertsVersion)
		}
		out = append(out, line)
	}
	ids := make([]string, 0, len(s.Workers))
	for id := range s.Workers {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		st := s.Workers[id]
		serving := false
		for _, r := range s.Replicas {
			for _, w := range r.Workers {
				serving = serving || w == id
			}
		}
		if serving && !full {
			continue
		}
		if !full {
			if i := strings.IndexAny(st, ":("); i > 0 {
				st = strings.TrimSpace(st[:i])
			}
		}
		out = append(out, fmt.Sprintf("  %s: %s", id, st))
	}
	return out
}
